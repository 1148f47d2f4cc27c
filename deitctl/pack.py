"""``deitctl data pack``: an ImageFolder as WebDataset tar shards, plus ``manifest.json``.

Each split becomes ``OUT/<split>-NNNNNN.tar``: plain (USTAR) tar files in the WebDataset
layout, ``<key>.<ext>`` (the image file's bytes) then ``<key>.cls`` (the class index in the
manifest's ``classes``, as text). A sample's key is its index in the split's ImageFolder
order (``00000042``), and samples are spread over the shards in a seeded random order, as
streaming wants. ``manifest.json``, written last, holds the classes, the counts per split
and class, and per shard the keys, classes, and each image's offset and size in the tar.

``max_side``: training images whose longer side exceeds it are decoded, converted to RGB
as the loader would, resized (Lanczos) to that longer side and re-encoded (JPEG sources as
JPEG at ``quality``, others as PNG); every other image is stored byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from deitctl.errors import UserError
from deitctl.shards import FORMAT, MANIFEST, VERSION

_JPEG = ("jpg", "jpeg")

Progress = Callable[[str, int | None], Callable[[int], None]]


def list_split(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(file, class index)]) exactly as torchvision's ImageFolder lists them."""
    from torchvision.datasets.folder import find_classes, make_dataset

    from deitctl.images import IMAGE_EXTENSIONS

    classes, class_to_idx = find_classes(str(path))
    samples = make_dataset(
        str(path), class_to_idx, is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS), allow_empty=True
    )
    return classes, samples


def _ext(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def prepare(path: str, max_side: int, quality: int) -> tuple[bytes, str]:
    """The bytes to store for one image file, and their extension."""
    data = Path(path).read_bytes()
    ext = _ext(path)
    if not max_side:
        return data, ext
    from PIL import Image

    from deitctl.images import load_rgb

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
        if max(w, h) <= max_side:
            return data, ext
        rgb = load_rgb(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return data, ext  # unreadable: stored as it is, reported when drawn (and by `data check`)
    scale = max_side / max(w, h)
    small = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if ext in _JPEG:
        small.save(out, "JPEG", quality=quality)
        return out.getvalue(), "jpg"
    small.save(out, "PNG")
    return out.getvalue(), "png"


def _prepare_chunk(paths: Sequence[str], max_side: int, quality: int) -> list[tuple[bytes, str]]:
    return [prepare(p, max_side, quality) for p in paths]


def _prepared(paths: Sequence[str], max_side: int, quality: int, workers: int) -> Iterator[tuple[bytes, str]]:
    """Each file's bytes, in order; re-encoding on ``workers`` processes."""
    if not max_side or workers <= 1:
        for p in paths:
            yield prepare(p, max_side, quality)
        return
    chunks = [paths[i : i + 32] for i in range(0, len(paths), 32)]
    with ProcessPoolExecutor(workers) as pool:
        for chunk in pool.map(_prepare_chunk, chunks, [max_side] * len(chunks), [quality] * len(chunks)):
            yield from chunk


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Writes one split's shards, starting a new one past ``limit`` bytes."""

    def __init__(self, out: Path, split: str, limit: int):
        self.out, self.split, self.limit = out, split, limit
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None

    def add(self, key: str, data: bytes, ext: str, target: int) -> None:
        if self.tar is not None and self.tar.offset + len(data) + 2048 > self.limit and self.shards[-1]["keys"]:
            self.close()
        if self.tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed by close())
            self.shards.append({"file": name, "keys": [], "exts": [], "targets": []})
        _member(self.tar, f"{key}.{ext}", data)
        _member(self.tar, f"{key}.cls", str(target).encode())
        shard = self.shards[-1]
        shard["keys"].append(key)
        shard["exts"].append(ext)
        shard["targets"].append(target)

    def close(self) -> None:
        """Finish the open shard; its images' offsets and sizes come from reading it back."""
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        shard = self.shards[-1]
        path = self.out / shard["file"]
        with tarfile.open(path, "r:") as tar:
            members = {m.name: m for m in tar}
        images = [members[f"{k}.{e}"] for k, e in zip(shard["keys"], shard["exts"])]
        shard["offsets"] = [m.offset_data for m in images]
        shard["sizes"] = [m.size for m in images]
        shard["bytes"] = path.stat().st_size


def pack(
    root: Path,
    out: Path,
    *,
    shard_mb: float = 256,
    max_side: int = 0,
    quality: int = 90,
    seed: int = 0,
    workers: int = 0,
    train_split: str = "train",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Pack every split of ``root``; returns the manifest."""
    from deitctl import __version__
    from deitctl.datacheck import image_folder_splits

    splits = image_folder_splits(root)
    if "." in splits:
        raise UserError(f"{root}: holds class folders directly; pack needs ROOT/<split>/<class>/<image>")
    if (out / MANIFEST).exists() and not overwrite:
        raise UserError(f"{out / MANIFEST} exists already: pass --overwrite, or pack into another folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        if overwrite and old.name.split("-")[0] in splits:
            old.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    listed = {name: list_split(path) for name, path in splits.items()}
    classes = sorted({c for names, _ in listed.values() for c in names})
    total = sum(len(samples) for _, samples in listed.values())
    advance = progress(f"packing {total:,} images", total) if progress else (lambda n: None)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created_by": f"deitctl {__version__}",
        "classes": classes,
        "splits": {},
    }
    workers = workers or os.cpu_count() or 1
    for split, (split_classes, samples) in listed.items():
        side = max_side if split == train_split else 0
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)  # shards of mixed classes, for streaming
        writer = _ShardWriter(out, split, int(shard_mb * 2**20))
        paths = [samples[i][0] for i in order]
        to_global = [classes.index(c) for c in split_classes]
        for i, (data, ext) in zip(order, _prepared(paths, side, quality, workers)):
            writer.add(f"{i:08d}", data, ext, to_global[samples[i][1]])
            advance(1)
        writer.close()
        counts = dict.fromkeys(split_classes, 0)
        for _, t in samples:
            counts[split_classes[t]] += 1
        manifest["splits"][split] = {
            "images": len(samples),
            "classes": split_classes,
            "counts": counts,
            "max_side": side or None,
            "shards": writer.shards,
        }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, separators=(",", ":")), encoding="utf-8")
    tmp.replace(out / MANIFEST)
    return manifest
