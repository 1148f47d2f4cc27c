"""A RAM cache of decoded images, for datasets small enough to hold.

Decoding a JPEG is a third of the loader's work per image at CIFAR size; a
cached image is the same PIL image the dataset's loader gave, pixel for pixel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from deitctl.data import base_and_indices, unreadable_errors

_CACHED_MODES = {"L": 1, "RGB": 3, "RGBA": 4}  # modes stored as plain bytes, h x w x channels
_MODE_OF_CHANNELS = {c: mode for mode, c in _CACHED_MODES.items()}


def _header_pixels(path: str) -> int | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except Exception:
        return None


def estimate_decoded_mb(paths: Sequence[str], probes: int = 64) -> float:
    """The RGB pixels of ``paths`` in MiB, from the headers of up to ``probes``
    files spread over them (nothing is decoded)."""
    if not paths:
        return 0.0
    step = max(1, len(paths) // probes)
    sizes = [n for n in map(_header_pixels, paths[::step][:probes]) if n]
    return (sum(sizes) / len(sizes) if sizes else 0) * 3 * len(paths) / 2**20


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class DecodedImages:
    """A DatasetFolder ``loader`` that returns images decoded once, in advance.

    The pixels live in one uint8 buffer (forked workers share its pages), and
    each call gives a fresh PIL image with exactly the pixels the wrapped
    loader gave. Files it could not decode, or in modes other than L, RGB and
    RGBA, are left to the wrapped loader, which reports them as before."""

    def __init__(self, loader: Callable[[str], Any], paths: Sequence[str], threads: int = 1):
        self.loader = loader
        started = time.perf_counter()
        unique = list(dict.fromkeys(paths))
        chunks = [unique[i : i + 256] for i in range(0, len(unique), 256)]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
            decoded = [a for chunk in pool.map(self._decode_all, chunks) for a in chunk]
        self.unreadable = {path: a for path, a in zip(unique, decoded) if isinstance(a, str)}
        """Files the loader could not read: path -> the error."""
        kept = [(path, a) for path, a in zip(unique, decoded) if isinstance(a, np.ndarray)]
        self.index = {path: i for i, (path, _) in enumerate(kept)}
        self.shapes = np.array([a.shape + (1,) * (3 - a.ndim) for _, a in kept], dtype=np.int64).reshape(-1, 3)
        sizes = self.shapes.prod(axis=1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for i, (_, a) in enumerate(kept):
            self.buffer[self.offsets[i] : self.offsets[i + 1]] = a.reshape(-1)
        self.uncached = len(unique) - len(kept)
        self.seconds = time.perf_counter() - started

    def _decode_all(self, paths: Sequence[str]) -> list[np.ndarray | str | None]:
        """Pixels, or the error of an unreadable file, or None (a mode left to the loader)."""
        out: list[np.ndarray | str | None] = []
        for path in paths:
            try:
                img = self.loader(path)
                out.append(np.asarray(img, dtype=np.uint8) if img.mode in _CACHED_MODES else None)
            except unreadable_errors() as exc:
                out.append(f"{type(exc).__name__}: {exc}")
            except Exception:  # the wrapped loader raises it again when the image is drawn
                out.append(None)
        return out

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def __call__(self, path: str) -> Any:
        i = self.index.get(path)
        if i is None:
            return self.loader(path)
        from PIL import Image

        h, w, c = self.shapes[i].tolist()
        pixels = memoryview(self.buffer)[self.offsets[i] : self.offsets[i + 1]]  # type: ignore[arg-type]
        return Image.frombytes(_MODE_OF_CHANNELS[c], (w, h), pixels)  # a copy: the cache stays read-only


def cache_decoded(dataset: Any, *, limit_mb: float, threads: int = 1) -> str:
    """Decode the images of a DatasetFolder-like dataset (``samples`` and a
    ``loader``; Subsets are seen through) into RAM once, when their pixels take
    at most ``limit_mb`` MiB. Returns what was done, for the log ("" when the
    dataset is not one that can be cached)."""
    base, indices = base_and_indices(dataset)
    samples, loader = getattr(base, "samples", None), getattr(base, "loader", None)
    if not samples or not callable(loader) or isinstance(loader, DecodedImages) or limit_mb <= 0:
        return ""
    paths = list(dict.fromkeys(str(samples[i][0]) for i in indices))
    estimate = estimate_decoded_mb(paths)
    if estimate > limit_mb:
        return f"{len(paths):,} images not cached: about {estimate:,.0f} MB decoded, over data.cache_mb = {limit_mb:g}"
    available = available_memory_mb()
    if available is not None and estimate > available / 4:
        return (
            f"{len(paths):,} images not cached: about {estimate:,.0f} MB decoded, over a quarter of the "
            f"{available:,.0f} MB of memory available"
        )
    cache = DecodedImages(loader, paths, threads)
    base.loader = cache
    other = cache.uncached - len(cache.unreadable)
    left = f"; {other} in other modes left to the loader" if other else ""
    return f"{len(cache):,} images decoded into RAM ({cache.nbytes / 2**20:,.1f} MB in {cache.seconds:.1f} s){left}"


def unreadable_found(dataset: Any) -> dict[str, str]:
    """The files the start-up decode of ``dataset`` (:func:`cache_decoded`) could not read,
    with their errors; empty when it was not decoded at start-up."""
    base, indices = base_and_indices(dataset)
    cache = getattr(base, "loader", None)
    if not isinstance(cache, DecodedImages) or not cache.unreadable:
        return {}
    used = {str(base.samples[i][0]) for i in indices}
    return {path: error for path, error in cache.unreadable.items() if path in used}
