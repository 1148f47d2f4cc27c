"""``deitctl data check``: decode every image of every split, in parallel, and report
what would stop a run or change what it sees.

Errors (exit 2): unreadable images, empty class folders, a class that one split has and
another lacks. Warnings (exit 0 unless ``--strict``): images in modes the loader converts
to RGB, tiny images, images so large that the loader reduces them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deitctl.errors import UserError

CHUNK = 32


@dataclass(frozen=True)
class Problem:
    """One finding; ``path`` is a file or folder (or ``shard:member`` in packed shards)."""

    kind: str
    """unreadable, empty_class, class_missing, mode, tiny, large"""
    severity: str
    """error or warning"""
    path: str
    detail: str
    split: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """An image to decode: a file, or ``size`` bytes at ``offset`` of a shard."""

    name: str
    split: str
    path: str
    offset: int = -1
    size: int = 0


@dataclass
class Report:
    problems: list[Problem]
    images: int
    splits: dict[str, list[str]]
    """Each split's classes."""

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return len(self.problems) - self.errors


# --------------------------------------------------------------------------- one image


def _open(sample: Sample) -> Any:
    import io

    from PIL import Image

    if sample.offset < 0:
        return Image.open(sample.path)
    with open(sample.path, "rb") as f:
        f.seek(sample.offset)
        data = f.read(sample.size)
    if len(data) != sample.size:
        raise OSError(f"the shard ends {sample.size - len(data)} bytes early")
    return Image.open(io.BytesIO(data))


def inspect(sample: Sample, min_side: int, max_side: int) -> list[Problem]:
    """Decode one image fully; what is wrong with it."""
    from PIL import Image

    from deitctl.images import unreadable_errors

    errors: tuple[type[BaseException], ...] = (*unreadable_errors(), ValueError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(sample) as img:
                mode, (w, h) = img.mode, img.size
                transparency = "transparency" in img.info
                img.load()
    except errors as exc:
        return [Problem("unreadable", "error", sample.name, f"{type(exc).__name__}: {exc}", sample.split)]
    found = []
    if mode != "RGB":
        what = (
            "composited on black, then RGB"
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and transparency)
            else ("clipped to 8 bits, then RGB" if mode.startswith(("I", "F")) else "converted to RGB")
        )
        found.append(Problem("mode", "warning", sample.name, f"mode {mode}: {what}", sample.split))
    if min(w, h) < min_side:
        found.append(Problem("tiny", "warning", sample.name, f"{w}x{h}, under {min_side} px", sample.split))
    if max(w, h) > max_side:
        found.append(
            Problem("large", "warning", sample.name, f"{w}x{h}: reduced to {max_side} px on load", sample.split)
        )
    return found


def _inspect_all(samples: Sequence[Sample], min_side: int, max_side: int) -> list[Problem]:
    return [p for s in samples for p in inspect(s, min_side, max_side)]


# --------------------------------------------------------------------------- the tree


def image_folder_splits(root: Path) -> dict[str, Path]:
    """The splits of an ImageFolder root: its folders that hold class folders (or
    ``root`` itself, as split ``"."``, when it holds class folders of images)."""
    from deitctl.images import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {p.name: p for p in subdirs if any(c.is_dir() for c in p.iterdir())}
    if splits:
        return splits
    if any(f.suffix.lower() in IMAGE_EXTENSIONS for d in subdirs for f in d.iterdir()):
        return {".": root}
    raise UserError(
        f"{root}: holds neither an ImageFolder (ROOT/<split>/<class>/<image>) nor packed shards (manifest.json)"
    )


def scan_folders(root: Path, train_split: str) -> tuple[list[Sample], dict[str, list[str]], list[Problem]]:
    """Every image file of every split, the classes of each, and the problems of the tree itself."""
    from deitctl.images import IMAGE_EXTENSIONS

    samples: list[Sample] = []
    classes: dict[str, list[str]] = {}
    problems: list[Problem] = []
    for split, path in image_folder_splits(root).items():
        classes[split] = []
        for cls in sorted(p for p in path.iterdir() if p.is_dir()):
            files = sorted(
                str(f)
                for dirpath, _, names in os.walk(cls, followlinks=True)
                for f in (Path(dirpath) / n for n in names)
                if f.suffix.lower() in IMAGE_EXTENSIONS
            )
            classes[split].append(cls.name)
            if not files:
                problems.append(Problem("empty_class", "error", str(cls), "no images in this class folder", split))
            samples += [Sample(f, split, f) for f in files]
    problems += missing_classes(root, classes, train_split)
    return samples, classes, problems


def missing_classes(root: Path | str, classes: dict[str, list[str]], train_split: str) -> list[Problem]:
    """A class that some split has and another lacks."""
    found = []
    every = sorted({c for names in classes.values() for c in names})
    for split, names in classes.items():
        for cls in sorted(set(every) - set(names)):
            has = [s for s, n in classes.items() if cls in n]
            found.append(
                Problem(
                    "class_missing",
                    "error",
                    f"{root}/{split}/{cls}",
                    f"class {cls!r} is in {', '.join(has)} but not in {split}"
                    + (" (training would not know it)" if split == train_split else ""),
                    split,
                )
            )
    return found


# --------------------------------------------------------------------------- all together


def _chunks(samples: Sequence[Sample]) -> Iterator[Sequence[Sample]]:
    for i in range(0, len(samples), CHUNK):
        yield samples[i : i + CHUNK]


def decode_all(
    samples: Sequence[Sample],
    *,
    workers: int,
    min_side: int,
    max_side: int,
    advance: Callable[[int], None] = lambda n: None,
) -> list[Problem]:
    """Decode every sample on ``workers`` processes (1: in this one)."""
    if workers <= 1 or len(samples) <= CHUNK:
        found = []
        for chunk in _chunks(samples):
            found += _inspect_all(chunk, min_side, max_side)
            advance(len(chunk))
        return found
    found = []
    with ProcessPoolExecutor(workers) as pool:
        futures: dict[Future[list[Problem]], int] = {
            pool.submit(_inspect_all, chunk, min_side, max_side): len(chunk) for chunk in _chunks(samples)
        }
        for future in futures:  # in order: the report lists problems in the order of the files
            found += future.result()
            advance(futures[future])
    return found


def check(
    root: Path,
    *,
    workers: int = 0,
    min_side: int = 32,
    train_split: str = "train",
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> Report:
    """Check an ImageFolder root, or a folder of packed shards (``deitctl data pack``)."""
    from deitctl.images import MAX_SIDE

    if (root / "manifest.json").is_file():
        from deitctl.shards import scan_shards

        samples, classes, problems = scan_shards(root, train_split)
    else:
        samples, classes, problems = scan_folders(root, train_split)
    workers = workers or os.cpu_count() or 1
    advance = progress(f"decoding {len(samples):,} images", len(samples)) if progress else (lambda n: None)
    problems += decode_all(samples, workers=workers, min_side=min_side, max_side=MAX_SIDE, advance=advance)
    order = {"empty_class": 0, "class_missing": 1}
    problems.sort(key=lambda p: (p.severity != "error", order.get(p.kind, 2)))
    return Report(problems, len(samples), classes)
