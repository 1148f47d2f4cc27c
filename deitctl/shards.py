"""Packed shards (``deitctl data pack``): the manifest, and random access into local shards.

:class:`ShardImages` reads a split of local shards by index, with the offsets the manifest
holds: it is a map-style dataset like an ImageFolder (same indices, classes and pixels), so
deitctl's samplers, seeded augmentation, image cache and exact resume apply unchanged.
Shards behind a URL are streamed instead (:mod:`deitctl.streaming`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from deitctl.errors import UserError
from deitctl.images import load_rgb

if TYPE_CHECKING:
    from deitctl.datacheck import Problem, Sample

FORMAT, VERSION, MANIFEST = "deitctl-webdataset", 1, "manifest.json"
NEITHER = (
    "holds neither packed shards (manifest.json of `deitctl data pack`) nor an ImageFolder (<split>/<class>/<image>)"
)


def is_url(root: str) -> bool:
    return "://" in root or root.startswith("pipe:")


def join(root: str, name: str) -> str:
    """Where ``name`` is under ``root``: a ``{}`` in ``root`` stands for it
    (``pipe:aws s3 cp s3://bucket/shards/{} -``)."""
    if "{}" in root:
        return root.replace("{}", name)
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def open_stream(location: str) -> IO[bytes]:
    """A local file, or a URL through the ``webdataset`` package (http, https, s3/gs via
    pipe:, ...)."""
    if not is_url(location):
        return open(location, "rb")
    try:
        from webdataset import gopen
    except ImportError as exc:
        raise UserError(
            f"{location}: reading shards from a URL needs the webdataset package: pip install 'deitctl[webdataset]'"
        ) from exc
    stream: IO[bytes] = gopen(location, "rb")
    return stream


def read_manifest(root: str) -> dict[str, Any]:
    """``root/manifest.json``; a root without one is a FileNotFoundError that says what it holds."""
    location = join(root, MANIFEST)
    if not is_url(root) and not Path(location).is_file():
        if not Path(root).is_dir():
            raise FileNotFoundError(f"no folder {root!r}")
        if _has_split_folders(Path(root)):
            raise FileNotFoundError(
                f'{root!r} holds an ImageFolder, not packed shards: use data.dataset = "imagefolder"'
            )
        raise FileNotFoundError(f"{root!r} {NEITHER}")
    try:
        with open_stream(location) as f:
            manifest = json.loads(f.read())
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"{location}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f'{location}: not a manifest of `deitctl data pack` (no "format": "{FORMAT}")')
    if manifest.get("version") != VERSION:
        raise UserError(f"{location}: manifest version {manifest.get('version')}, this deitctl reads {VERSION}")
    return manifest


def _has_split_folders(root: Path) -> bool:
    return any(p.is_dir() and any(c.is_dir() for c in p.iterdir()) for p in root.iterdir())


@dataclass
class SplitIndex:
    """One split of a manifest, checked, with per-sample arrays in dataset-index order."""

    root: str
    split: str
    classes: list[str]
    """The split's own classes (an ImageFolder of the split would have the same)."""
    files: list[str]
    shard_keys: list[list[str]]
    shard_exts: list[list[str]]
    shard_bytes: list[int]
    shard_of: np.ndarray
    position: np.ndarray
    """Each sample's place in its shard."""
    offsets: np.ndarray
    sizes: np.ndarray
    targets: list[int]
    """Index into ``classes``, by dataset index."""

    def __len__(self) -> int:
        return len(self.targets)

    def location(self, shard: int) -> str:
        return join(self.root, self.files[shard])

    def name(self, index: int) -> str:
        """``<shard>:<key>.<ext>`` of a sample, for messages."""
        s, p = int(self.shard_of[index]), int(self.position[index])
        return f"{self.location(s)}:{self.shard_keys[s][p]}.{self.shard_exts[s][p]}"


def split_index(manifest: dict[str, Any], root: str, split: str) -> SplitIndex:
    """The arrays of ``split``; a manifest that contradicts itself names ``manifest.json``."""
    where = join(root, MANIFEST)
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise FileNotFoundError(f"no split {split!r} in {where} (it has: {', '.join(splits) or 'none'})")
    try:
        info = splits[split]
        every = list(manifest["classes"])
        own = list(info["classes"])
        to_local = {every.index(c): i for i, c in enumerate(own)}
        n = int(info["images"])
        shard_of, position = np.full(n, -1, np.int32), np.zeros(n, np.int32)
        offsets, sizes = np.zeros(n, np.int64), np.zeros(n, np.int64)
        targets = [-1] * n
        shards = info["shards"]
        for s, shard in enumerate(shards):
            keys, lengths = shard["keys"], {len(shard[k]) for k in ("keys", "exts", "targets", "offsets", "sizes")}
            if len(lengths) != 1:
                raise ValueError(f"shard {shard['file']}: lists of different lengths")
            for p, key in enumerate(keys):
                i = int(key)
                if not 0 <= i < n or shard_of[i] >= 0:
                    raise ValueError(f"shard {shard['file']}: key {key!r} out of range or repeated")
                shard_of[i], position[i] = s, p
                offsets[i], sizes[i] = shard["offsets"][p], shard["sizes"][p]
                targets[i] = to_local[shard["targets"][p]]
        if (shard_of < 0).any():
            raise ValueError(f"{int((shard_of < 0).sum())} of the {n} images are in no shard")
        return SplitIndex(
            root,
            split,
            own,
            [sh["file"] for sh in shards],
            [sh["keys"] for sh in shards],
            [sh["exts"] for sh in shards],
            [int(sh["bytes"]) for sh in shards],
            shard_of,
            position,
            offsets,
            sizes,
            targets,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: split {split!r} is malformed ({type(exc).__name__}: {exc})") from exc


def _header(fd: int, offset: int) -> tarfile.TarInfo:
    return tarfile.TarInfo.frombuf(os.pread(fd, 512, offset - 512), "utf-8", "surrogateescape")


def shard_mismatches(index: SplitIndex) -> list[tuple[str, str]]:
    """(file, what is wrong) for each local shard that is missing, of another size than the
    manifest says, or whose first and last image are not where the manifest puts them."""
    found = []
    first_last: dict[int, list[int]] = {}
    for i, s in enumerate(index.shard_of.tolist()):
        pair = first_last.setdefault(s, [i, i])
        if index.position[i] < index.position[pair[0]]:
            pair[0] = i
        if index.position[i] > index.position[pair[1]]:
            pair[1] = i
    for s in range(len(index.files)):
        path = index.location(s)
        try:
            size = os.path.getsize(path)
        except OSError:
            found.append((path, f"missing (listed in {MANIFEST})"))
            continue
        if size != index.shard_bytes[s]:
            found.append((path, f"{size:,} bytes, but {MANIFEST} says {index.shard_bytes[s]:,}: not the shard packed"))
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in first_last.get(s, []):
                member = index.name(i).rsplit(":", 1)[1]
                try:
                    head = _header(fd, int(index.offsets[i]))
                    ok = head.name == member and head.size == int(index.sizes[i])
                except (tarfile.TarError, OSError, ValueError):
                    ok = False
                if not ok:
                    found.append((path, f"{member} is not at byte {int(index.offsets[i]):,} as {MANIFEST} says"))
                    break
        finally:
            os.close(fd)
    return found


class _Names(Sequence[tuple[str, int]]):
    """``samples`` as an ImageFolder has them: (name, target), computed on demand."""

    def __init__(self, dataset: ShardImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset.index.name(i), self.dataset.targets[i]


class ShardImages:
    """A split of local shards, read by index (the ImageFolder interface: ``classes``,
    ``targets``, ``samples``, ``loader``, ``transform``, ``target_transform``)."""

    def __init__(self, index: SplitIndex, transform: Callable[[Any], Any] | None = None):
        self.index, self.transform = index, transform
        self.target_transform: Callable[[int], int] | None = None
        self.classes, self.targets = index.classes, list(index.targets)
        self.samples = _Names(self)
        self.loader: Callable[[str], Any] = self.read
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def raw(self, i: int) -> bytes:
        """The stored bytes of sample ``i``."""
        if self._pid != os.getpid():  # a forked worker opens its own files
            self._fds, self._pid = {}, os.getpid()
        s = int(self.index.shard_of[i])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.index.location(s), os.O_RDONLY)
        size = int(self.index.sizes[i])
        data = os.pread(fd, size, int(self.index.offsets[i]))
        if len(data) != size:
            raise OSError(f"the shard ends {size - len(data)} bytes early")
        return data

    def read(self, name: str) -> Any:
        """The RGB image called ``name`` (``<shard>:<key>.<ext>``; the key is the index)."""
        return load_rgb(io.BytesIO(self.raw(int(name.rsplit(":", 1)[1].split(".", 1)[0]))))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        name, target = self.samples[i]
        image = self.loader(name)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def open_local(root: str, split: str, transform: Callable[[Any], Any] | None) -> ShardImages:
    """A split of local shards, checked against the manifest (a mismatch names the shard)."""
    index = split_index(read_manifest(root), root, split)
    bad = shard_mismatches(index)
    if bad:
        path, what = bad[0]
        more = f" (and {len(bad) - 1} more shards)" if len(bad) > 1 else ""
        raise UserError(f"{path}: {what}{more}; pack the data again with `deitctl data pack`")
    return ShardImages(index, transform)


def open_split(
    root: str, split: str, transform: Callable[[Any], Any] | None, *, stream: bool = False, shuffle_buffer: int = 1000
) -> Any:
    """:class:`ShardImages` for local shards, a :class:`~deitctl.streaming.ShardStream`
    for a URL (or with ``stream``)."""
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
    if not (stream or is_url(root)):
        return open_local(root, split, transform)
    from deitctl.streaming import ShardStream

    return ShardStream(split_index(read_manifest(root), root, split), transform, shuffle_buffer)


def scan_shards(root: Path, train_split: str) -> tuple[list[Sample], dict[str, list[str]], list[Problem]]:
    """For ``data check``: every image of every split, the classes, and problems of the shards."""
    from deitctl.datacheck import Problem, Sample, missing_classes

    manifest = read_manifest(str(root))
    samples: list[Sample] = []
    classes: dict[str, list[str]] = {}
    problems: list[Problem] = []
    for split, info in (manifest.get("splits") or {}).items():
        index = split_index(manifest, str(root), split)
        classes[split] = index.classes
        for cls in index.classes:
            if not info.get("counts", {}).get(cls):
                problems.append(
                    Problem("empty_class", "error", f"{root}/{split}:{cls}", "no images of this class", split)
                )
        bad = shard_mismatches(index)
        problems += [Problem("shard", "error", path, what, split) for path, what in bad]
        broken = {path for path, _ in bad}
        samples += [
            Sample(index.name(i), split, index.location(int(s)), int(index.offsets[i]), int(index.sizes[i]))
            for i, s in enumerate(index.shard_of.tolist())
            if index.location(s) not in broken
        ]
    problems += missing_classes(root, classes, train_split)
    return samples, classes, problems
