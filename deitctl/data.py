"""Data loading: per-sample seeded augmentation, repeated augmentation, loaders
that finish ToTensor/Normalize (and erasing) a batch at a time (:mod:`deitctl.batches`).

Every sample's augmentation is seeded from (run seed, epoch, position), so a
run is reproducible for any worker count and resumes exactly. Batch-level
normalisation changes no value of a batch.
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import sys
import weakref
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from deitctl.batches import (
    Collate,
    ErasePatches,
    ToUint8Tensor,
    base_and_indices,
    defer_normalize,
    finish_images,
)
from deitctl.images import unreadable_errors
from deitctl.samplers import RepeatedAugSampler, SeededSampler, ShuffleSampler


class BadImageError(Exception):
    """An image that cannot be read (the message names its path)."""


class BadShardError(Exception):
    """A shard that cannot be read, or that its manifest does not describe (the message names it)."""


def seed_sample(seed: int) -> None:
    """Seed the RNGs a transform draws from (Python, NumPy, torch's CPU generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds CUDA, 80x slower


def sample_path(dataset: Any, index: int) -> str:
    """The file behind ``dataset[index]`` (through Subsets), where the dataset says."""
    while isinstance(dataset, Subset):
        index, dataset = dataset.indices[index], dataset.dataset
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples else f"sample {index}"


def clean_error_message(exc: BaseException) -> str:
    """The original message of an exception re-raised by a DataLoader worker."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.split(".")[-1] == type(exc).__name__ else last


def _worker_init(_: int, nice: int = 0) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which stops cleanly
    (a Ctrl-C or a scheduler's SIGTERM reaches the whole process group), and
    run ``nice`` steps below it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice and hasattr(os, "nice"):
        os.nice(nice)


class SeededDataset(Dataset):
    """Runs the wrapped dataset's transform under a per-sample seed; unreadable
    images stop the run (``bad_images="error"``) or are replaced by the next
    readable one and counted (``"skip"``)."""

    def __init__(self, dataset: Dataset, bad_images: str = "error"):
        import multiprocessing

        self.dataset, self.bad_images = dataset, bad_images
        self.skipped = multiprocessing.Value("i", 0)  # shared with forked workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> list[Any]:
        """A batch's samples (the DataLoader fetches whole batches through this)."""
        if torch.utils.data.get_worker_info() is not None:
            return [self._seeded(index, seed) for index, seed in items]
        # in the main process: leave the training RNG streams untouched (saved once a batch)
        py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._seeded(index, seed) for index, seed in items]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(pt)

    def _seeded(self, index: int, seed: int) -> Any:
        size = len(self)
        for _attempt in range(min(size, 16)):
            seed_sample(seed)
            try:
                return self.dataset[index]
            except unreadable_errors() as exc:
                path = sample_path(self.dataset, index)
                cause = f"{type(exc).__name__}: {exc}"
                if self.bad_images != "skip":
                    raise BadImageError(f"{path}: unreadable image ({cause})") from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                sys.stderr.write(f"warning: skipping unreadable image {path} ({cause})\n")
                index = (index + 1) % size
        raise BadImageError(f"{sample_path(self.dataset, index)}: too many unreadable images in a row")


def per_class_subset(dataset: Any, limit: int) -> Any:
    """The first ``limit`` images of each class (deterministic); a dataset with a
    ``select(indices)`` method (a stream) makes the subset itself."""
    targets = getattr(dataset, "targets", None)
    if not limit or targets is None:
        return dataset
    counts: dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets):
        if counts.get(t, 0) < limit:
            counts[t] = counts.get(t, 0) + 1
            keep.append(i)
    if callable(getattr(dataset, "select", None)):
        return dataset.select(keep)
    subset = Subset(dataset, keep)
    subset.targets = [targets[i] for i in keep]  # type: ignore[attr-defined]
    return subset


def without_files(dataset: Any, paths: Collection[str]) -> Any:
    """``dataset`` (a DatasetFolder-like one, through Subsets) without the samples read from
    ``paths``; the same object when none of them is used."""
    base, indices = base_and_indices(dataset)
    keep = [i for i in indices if str(base.samples[i][0]) not in paths]
    if len(keep) == len(indices):
        return dataset
    subset = Subset(base, keep)
    subset.targets = [base.targets[i] for i in keep]  # type: ignore[attr-defined]
    return subset


def empty_class_folders(dataset: Any) -> list[str]:
    """The classes of ``dataset`` (through Subsets) that have no images, as paths when the
    dataset has a ``root`` (``ROOT/<split>/<class>``), else as names."""
    base, _ = base_and_indices(dataset)
    targets, classes = getattr(base, "targets", None), getattr(base, "classes", None)
    if targets is None or not classes:
        return []
    counts = Counter(targets)
    root = getattr(base, "root", None)
    return [os.path.join(str(root), str(c)) if root else str(c) for i, c in enumerate(classes) if not counts.get(i)]


class Loader(DataLoader):
    """A DataLoader whose uint8 image batches (see :class:`ToUint8Tensor`) are
    scaled and normalised on arrival, on ``device`` when given (they cross
    to a GPU as bytes)."""

    def __init__(
        self, *args: Any, finish: ToUint8Tensor | None = None, device: torch.device | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.finish, self.device = finish, device
        self._stats: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _finish(self, batch: Any) -> Any:
        if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
            return batch
        patches = batch[-1] if isinstance(batch[-1], ErasePatches) else None
        if patches is not None:
            batch = batch[:-1]
        images = batch[0]
        if images.dtype != torch.uint8:
            return batch
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        if images.device not in self._stats:
            assert self.finish is not None
            self._stats[images.device] = (
                torch.tensor(self.finish.mean, device=images.device).view(1, -1, 1, 1),
                torch.tensor(self.finish.std, device=images.device).view(1, -1, 1, 1),
            )
        images = finish_images(images, *self._stats[images.device])
        return (patches.apply(images) if patches else images, *batch[1:])

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Read ``epoch`` next, leaving out this process's first ``skip`` samples (mid-epoch resume)."""
        target = self.dataset if isinstance(self.dataset, IterableDataset) else self.sampler
        target.set_epoch(epoch, skip=skip)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        if isinstance(self.dataset, IterableDataset):
            return self.dataset.num_batches()  # type: ignore[attr-defined]
        return super().__len__()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        _WORKERS.update(getattr(batches, "_workers", ()))
        if self.finish is None:
            return batches
        return map(self._finish, batches)


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    repeats: int = 1,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    bad_images: str = "error",
    worker_nice: int = 0,
    device: torch.device | None = None,
) -> Loader:
    """The loader of a split. A transform ending in ``ToTensor(), Normalize()`` is
    finished per batch (:func:`defer_normalize`), on ``device`` when given. A stream
    (an IterableDataset with ``configure``, e.g. :class:`deitctl.streaming.ShardStream`)
    shares itself out over processes and workers; map-style data goes through deitctl's samplers."""
    size = len(dataset)
    finish = defer_normalize(dataset)
    sampling: dict[str, Any]
    if isinstance(dataset, IterableDataset):
        dataset.configure(  # type: ignore[attr-defined]
            train=train,
            seed=seed,
            batch_size=batch_size,
            num_replicas=num_replicas,
            rank=rank,
            repeats=repeats if train else 1,
            num_workers=num_workers,
            bad_images=bad_images,
        )
        sampling = {"dataset": dataset}
    else:
        if train and repeats > 1:
            base: Sampler[int] = RepeatedAugSampler(
                size, repeats=repeats, seed=seed, num_replicas=num_replicas, rank=rank
            )
        else:
            base = ShuffleSampler(size, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=train, pad=train)
        sampling = {"dataset": SeededDataset(dataset, bad_images), "sampler": SeededSampler(base, seed)}
    loader = Loader(
        **sampling,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=functools.partial(_worker_init, nice=worker_nice) if num_workers > 0 else None,
        # a fixed base seed: the loader draws nothing from the global RNG (samples are seeded one by one)
        generator=torch.Generator().manual_seed(seed),
        collate_fn=Collate(finish) if finish is not None else None,
        finish=finish,
        device=device if device is not None and device.type != "cpu" else None,
    )
    if num_workers > 0:
        _track(loader)
    return loader


_LIVE_LOADERS: weakref.WeakSet[DataLoader] = weakref.WeakSet()
_WORKERS: weakref.WeakSet[Any] = weakref.WeakSet()  # every worker process our loaders started


def _track(loader: DataLoader) -> None:
    """Release the workers of loaders still alive at exit: they ignore SIGTERM, so
    multiprocessing's own exit handler (terminate, then join) would wait forever."""
    if not _LIVE_LOADERS:
        atexit.unregister(_release_all)  # registered once, and after multiprocessing's handler
        atexit.register(_release_all)
    _LIVE_LOADERS.add(loader)


def _release_all() -> None:
    for loader in list(_LIVE_LOADERS):
        release_workers(loader)
    _kill_orphaned_workers()


def _kill_orphaned_workers() -> None:
    """Kill the workers of loaders the cyclic garbage collector freed: it closes
    their queues before the loader's shutdown message goes out, so they wait
    for work forever, and they ignore SIGTERM."""
    for process in list(_WORKERS):
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def release_workers(loader: Any) -> None:
    """Stop a loader's persistent worker processes now (they would otherwise sit
    on prefetched batches until the loader is garbage-collected)."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if iterator is not None:
        loader._iterator = None


def check_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> list[str]:
    """Names of validation classes that training does not have."""
    return [c for c in val_classes if c not in set(train_classes)]
