"""``deitctl data cifar10``: the official CIFAR-10 python archive to an ImageFolder of PNGs.

The archive (``cifar-10-python.tar.gz``, as torchvision downloads it) holds five training
batches, a test batch and ``batches.meta``, pickled by Python 2: byte-string keys, arrays
rebuilt through ``numpy.core.multiarray._reconstruct``. They are read with an unpickler that
builds plain data only (dicts, lists, strings, ints and NumPy arrays of numbers); a pickle
that names anything else is refused before anything runs or is written.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deitctl.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # as torchvision records it
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
MARKER = ".deitctl-cifar10"
"""Written last into DEST: the import is complete."""

Progress = Callable[[str, int | None], Callable[[int], None]]
"""``progress(description, total)`` returns ``advance(n)``."""


def _no_progress(description: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


# --------------------------------------------------------------------------- the restricted unpickler


def _numpy_reconstruct() -> Callable[..., Any]:
    import importlib

    try:
        module = importlib.import_module("numpy._core.multiarray")  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        module = importlib.import_module("numpy.core.multiarray")
    reconstruct: Callable[..., Any] = module._reconstruct
    return reconstruct


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("an array of a subclass of numpy.ndarray")
    return _numpy_reconstruct()(np.ndarray, shape, typecode)


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"a dtype given by {type(spec).__name__}")
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    return dtype


def _latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, "latin1")``: how Python 3 writes bytes in a protocol-2 pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than bytes written as latin-1 text")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the archive's (Python 2, NumPy 1)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # NumPy 2 writes this name
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, bytes, numbers and NumPy arrays of numbers;
    any other global a pickle names raises :class:`pickle.UnpicklingError` unresolved."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not plain data")
        return found


def load_plain(data: bytes) -> Any:
    """A Python-2 pickle of plain data, keys and strings as bytes."""
    return PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()


# --------------------------------------------------------------------------- the archive


def _members(archive: Path) -> dict[str, bytes]:
    """The batches and ``batches.meta`` of the archive, by base name."""
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in wanted and member.isfile():
                    fileobj = tar.extractfile(member)
                    assert fileobj is not None
                    found[base] = fileobj.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{archive}: not a readable tar.gz archive ({exc})") from exc
    missing = sorted(wanted - found.keys())
    if missing:
        raise UserError(
            f"{archive}: not the CIFAR-10 python archive: {', '.join(missing)} missing "
            f"(expected cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}})"
        )
    return found


def _field(batch: Any, key: bytes, where: str) -> Any:
    if not isinstance(batch, dict) or key not in batch:
        raise UserError(f"{where}: no {key.decode()!r} in the batch; not the CIFAR-10 python archive")
    return batch[key]


def _batch(raw: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N]) of one batch."""
    try:
        batch = load_plain(raw)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{where}: refused to unpickle: {exc}; nothing was run or written") from None
    except Exception as exc:
        raise UserError(f"{where}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    data, labels = _field(batch, b"data", where), _field(batch, b"labels", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{where}: 'data' is not a uint8 array of shape [N, 3072]")
    labels = np.asarray(labels)
    if (
        labels.shape != (data.shape[0],)
        or labels.dtype.kind not in "iu"
        or not ((labels >= 0) & (labels < num_classes)).all()
    ):
        raise UserError(f"{where}: 'labels' is not one class index below {num_classes} per image")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def read_archive(archive: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {"train": (images, labels), "test": ...}); every pickle is read
    and checked before the caller writes anything."""
    members = _members(archive)
    where = f"{archive}: {META}"
    try:
        meta = load_plain(members[META])
    except pickle.UnpicklingError as exc:
        raise UserError(f"{where}: refused to unpickle: {exc}; nothing was run or written") from None
    except Exception as exc:
        raise UserError(f"{where}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    names = _field(meta, b"label_names", where)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) and n for n in names):
        raise UserError(f"{where}: 'label_names' is not a list of class names")
    classes = [n.decode("utf-8") for n in names]
    if len(set(classes)) != len(classes) or any("/" in c or c.startswith(".") for c in classes):
        raise UserError(f"{where}: class names are not distinct folder names: {classes}")
    train = [_batch(members[b], f"{archive}: {b}", len(classes)) for b in TRAIN_BATCHES]
    test = _batch(members[TEST_BATCH], f"{archive}: {TEST_BATCH}", len(classes))
    splits = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": test,
    }
    return classes, splits


# --------------------------------------------------------------------------- download


def download(url: str, path: Path, md5: str, progress: Progress = _no_progress) -> None:
    """``url`` to ``path`` (via ``path.part``), checked against ``md5``; a failed or wrong
    download leaves nothing behind."""
    import urllib.error
    import urllib.request

    part = path.with_name(path.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            length = response.headers.get("Content-Length")
            advance = progress(f"downloading {url}", int(length) if length and length.isdigit() else None)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                advance(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"could not download {url} ({reason}); download it yourself and pass --from cifar-10-python.tar.gz"
        ) from exc
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise UserError(
            f"{url}: the download's MD5 is {digest.hexdigest()}, not {md5} (the official archive's); "
            "it was removed: try again, or download it yourself and pass --from"
        )
    part.replace(path)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the ImageFolder


def _write_pngs(
    root: Path, classes: list[str], images: np.ndarray, labels: np.ndarray, advance: Callable[[int], None]
) -> None:
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)

    def write(start: int) -> int:
        end = min(start + 500, len(images))
        for i in range(start, end):
            Image.fromarray(images[i], "RGB").save(root / classes[labels[i]] / f"{i:05d}.png")
        return end - start

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for n in pool.map(write, range(0, len(images), 500)):
            advance(n)


def is_imported(dest: Path) -> bool:
    return (dest / MARKER).is_file()


def import_cifar10(
    dest: Path,
    *,
    archive: Path | None = None,
    keep_archive: bool = False,
    url: str | None = None,
    md5: str | None = None,
    progress: Progress = _no_progress,
) -> dict[str, int]:
    """Write ``dest/train/<class>/NNNNN.png`` and ``dest/test/<class>/NNNNN.png`` (image i
    of a split is torchvision's ``CIFAR10(...)[i]``). Without ``archive``, the official one
    is downloaded into ``dest`` and checked. Returns the image count of each split ({} when
    ``dest`` holds a finished import already)."""
    url, md5 = url or URL, md5 or MD5
    if is_imported(dest):
        return {}
    for split in ("train", "test"):
        if (dest / split).exists():
            raise UserError(f"{dest / split} exists already: remove it, or import into another folder")
    dest.mkdir(parents=True, exist_ok=True)
    downloaded = archive is None
    if archive is None:
        archive = dest / ARCHIVE
        if not (archive.is_file() and file_md5(archive) == md5):
            download(url, archive, md5, progress)
    elif not archive.is_file():
        raise UserError(f"--from: no such file {archive}")
    classes, splits = read_archive(archive)
    staging = dest / ".cifar10-import"
    shutil.rmtree(staging, ignore_errors=True)
    total = sum(len(y) for _, y in splits.values())
    advance = progress(f"writing {total:,} PNG files", total)
    for split, (images, labels) in splits.items():
        _write_pngs(staging / split, classes, images, labels, advance)
    for split in splits:
        (staging / split).replace(dest / split)
    staging.rmdir()
    (dest / MARKER).write_text(f"CIFAR-10 from {archive.name}, {total} images\n", encoding="utf-8")
    if downloaded and not keep_archive:
        archive.unlink(missing_ok=True)
    return {split: len(labels) for split, (_, labels) in splits.items()}
