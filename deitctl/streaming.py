"""Streaming packed shards (from a URL, or local with ``stream = true``): an IterableDataset
that reads each shard front to back and keeps deitctl's guarantees.

An epoch is a sequence of positions. Training: the shards in a seeded order per epoch (each
shard's samples were shuffled when packed); with ``repeats`` k > 1, epoch e takes the
(e mod k)-th k-th of that order and gives each of its images k times, so that an epoch keeps
the length of one pass and every k epochs show every image k times. Process r reads the
positions [r·L, (r+1)·L) with L = ⌈E/world⌉ (wrapping round, as DistributedSampler pads),
in whole batches; its loader workers take contiguous runs of those batches, and a seeded
shuffle buffer mixes each worker's run. Evaluation reads every image exactly once, in order,
split over processes and workers.

Each sample's augmentation is seeded from (seed, epoch, position), as with map-style data.
Resume: exact at epoch boundaries; mid-epoch, exact when the process and worker counts are
the ones the run stopped with (the batches already trained are read again, not decoded).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import random
import sys
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from deitctl.data import BadImageError, BadShardError, seed_sample
from deitctl.images import load_rgb, unreadable_errors
from deitctl.samplers import sample_seed
from deitctl.shards import MANIFEST, SplitIndex, open_stream

Item = tuple[int, int, str, bytes]
"""(position in the epoch, dataset index, name, stored bytes)"""


# --------------------------------------------------------------------------- who reads what


class Share(NamedTuple):
    lo: int
    """The epoch's first image in the cycle's sequence."""
    positions: int
    """The epoch's positions (E)."""
    cycle: int
    start: int
    """This process's first position."""
    size: int
    """This process's positions."""
    batches: int


def epoch_span(size: int, repeats: int, epoch: int, train: bool) -> tuple[int, int, int]:
    """(first image of this epoch in the cycle's order, the epoch's positions, the cycle)."""
    if not train or repeats <= 1:
        return 0, size, epoch
    per = size // repeats
    return (epoch % repeats) * per, per * repeats, epoch // repeats


def rank_share(positions: int, world: int, rank: int, batch: int, train: bool) -> tuple[int, int, int]:
    """(first position, positions, batches) of process ``rank``: training in equal shares of
    whole batches, evaluation every position once."""
    if train:
        share = math.ceil(positions / world)
        batches = share // batch
        return rank * share, batches * batch, batches
    start, end = rank * positions // world, (rank + 1) * positions // world
    return start, end - start, math.ceil((end - start) / batch)


def worker_share(start: int, count: int, batches: int, batch: int, workers: int, worker: int) -> tuple[int, int]:
    """(first position, end) of a loader worker: a contiguous run of whole batches."""
    b0, b1 = worker * batches // workers, (worker + 1) * batches // workers
    return start + b0 * batch, min(start + b1 * batch, start + count)


def resumed_roles(batches: list[int], skip: int) -> tuple[list[int], list[int]]:
    """For a loader that leaves out its first ``skip`` batches: which original worker each of
    its workers plays, and how many batches each original worker leaves out.

    A loader takes batch i of worker w in the order of i·W + w (passing over workers that
    ran out), starting at worker 0. Loader worker j plays worker (j + r) mod W, where
    (i0, r) is the first batch left to read, so that the order of what is left is kept."""
    workers = len(batches)
    cells = [(i, w) for i in range(max(batches, default=0)) for w, n in enumerate(batches) if i < n]
    if skip <= 0 or skip >= len(cells):
        done = 0 if skip <= 0 else 1 << 62
        return list(range(workers)), [min(n, done) for n in batches]
    i0, r = cells[skip]
    return [(j + r) % workers for j in range(workers)], [min(n, i0 + (w < r)) for w, n in enumerate(batches)]


# --------------------------------------------------------------------------- the dataset


class ShardStream(IterableDataset):
    """A split of packed shards, streamed. :func:`deitctl.data.make_loader` calls
    :meth:`configure`; the trainer calls :meth:`set_epoch` before each epoch."""

    def __init__(self, index: SplitIndex, transform: Callable[[Any], Any] | None = None, shuffle_buffer: int = 1000):
        self.index, self.transform, self.shuffle_buffer = index, transform, shuffle_buffer
        self.target_transform: Callable[[int], int] | None = None
        self.classes, self.targets = index.classes, list(index.targets)
        self.members = [[int(k) for k in keys] for keys in index.shard_keys]
        self.keep: np.ndarray | None = None
        self.train, self.seed, self.batch_size, self.repeats, self.bad_images = False, 0, 1, 1, "error"
        self.num_replicas, self.rank, self.num_workers = 1, 0, 0
        self._epoch = multiprocessing.Value("i", 0)  # shared with forked (persistent) workers
        self._skip = multiprocessing.Value("q", 0)
        self.skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.index) if self.keep is None else int(self.keep.sum())

    def select(self, indices: list[int]) -> ShardStream:
        """The same stream over the images ``indices`` only (``data.train_per_class``)."""
        other = ShardStream(self.index, self.transform, self.shuffle_buffer)
        other.keep = np.zeros(len(self.index), dtype=bool)
        other.keep[indices] = True
        other.target_transform = self.target_transform
        return other

    def configure(
        self,
        *,
        train: bool,
        seed: int,
        batch_size: int,
        num_replicas: int,
        rank: int,
        repeats: int,
        num_workers: int,
        bad_images: str,
    ) -> None:
        self.train, self.seed, self.batch_size, self.repeats = train, seed, batch_size, repeats
        self.num_replicas, self.rank, self.num_workers, self.bad_images = num_replicas, rank, num_workers, bad_images

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch to read, leaving out this process's first ``skip`` samples (whole batches)."""
        self._epoch.value, self._skip.value = epoch, skip // self.batch_size

    def _share(self) -> Share:
        lo, positions, cycle = epoch_span(len(self), self.repeats, self._epoch.value, self.train)
        return Share(
            lo, positions, cycle, *rank_share(positions, self.num_replicas, self.rank, self.batch_size, self.train)
        )

    def _worker_batches(self) -> list[int]:
        s, workers = self._share(), max(1, self.num_workers)
        runs = [worker_share(s.start, s.size, s.batches, self.batch_size, workers, w) for w in range(workers)]
        return [math.ceil((end - begin) / self.batch_size) for begin, end in runs]

    def num_batches(self) -> int:
        """Batches this process reads this epoch, after the skipped ones."""
        return sum(self._worker_batches()) - self._skip.value

    # ---------------------------------------------------------------- reading

    def _order(self, cycle: int) -> list[int]:
        shards = list(range(len(self.index.files)))
        if self.train:
            random.Random(self.seed * 10_007 + cycle).shuffle(shards)
        return shards

    def _kept(self, shard: int) -> list[int]:
        members = self.members[shard]
        return members if self.keep is None else [i for i in members if self.keep[i]]

    def _shard_samples(self, shard: int) -> Iterator[tuple[int, str, bytes]]:
        """(dataset index, name, bytes) of one shard, checked against the manifest."""
        location, expected, keys = self.index.location(shard), self.members[shard], self.index.shard_keys[shard]
        seen = 0
        try:
            with open_stream(location) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    if not member.isfile() or ext == "cls":
                        continue
                    if seen >= len(keys) or key != keys[seen]:
                        raise BadShardError(
                            f"{location}: holds {member.name} where {MANIFEST} lists "
                            f"{keys[seen] if seen < len(keys) else 'nothing'}: the manifest does not match"
                        )
                    handle = tar.extractfile(member)
                    assert handle is not None
                    yield expected[seen], f"{location}:{member.name}", handle.read()
                    seen += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BadShardError(f"{location}: unreadable shard ({type(exc).__name__}: {exc})") from None
        if seen < len(expected):
            raise BadShardError(f"{location}: ends after {seen} of the {len(expected)} images {MANIFEST} lists")

    def _images(self, order: list[int], first: int, last: int) -> Iterator[tuple[int, str, bytes]]:
        """Images ``first`` to ``last - 1`` of the cycle's sequence (kept images of the shards in ``order``)."""
        q = 0
        for shard in order:
            kept = self._kept(shard)
            if q + len(kept) <= first:
                q += len(kept)
                continue
            wanted = set(kept) if self.keep is not None else None
            for index, name, data in self._shard_samples(shard):
                if wanted is not None and index not in wanted:
                    continue
                if q >= first:
                    yield index, name, data
                q += 1
                if q >= last:
                    return

    def _items(self, begin: int, end: int) -> Iterator[Item]:
        """The items of positions ``begin`` to ``end - 1``: position p shows image
        lo + (p mod E) // k of the cycle's sequence."""
        share = self._share()
        order, k, positions = self._order(share.cycle), self.repeats if self.train else 1, share.positions
        p0 = begin
        while p0 < end:  # at most two runs: a share may wrap round the end of the epoch
            p1 = min(end, p0 - p0 % positions + positions)
            v0 = p0 % positions
            first, last = v0 // k, (v0 + p1 - p0 - 1) // k
            position = p0
            images = self._images(order, share.lo + first, share.lo + last + 1)
            for q, (index, name, data) in enumerate(images, start=first):
                while position < p1 and (position - p0 + v0) // k == q:
                    yield position, index, name, data
                    position += 1
            p0 = p1

    def _shuffled(self, items: Iterator[Item], rng: random.Random) -> Iterator[Item]:
        if not self.train or self.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list[Item] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, s = self._epoch.value, self._share()
        roles, skips = resumed_roles(self._worker_batches(), self._skip.value)
        role = roles[worker]  # after a mid-epoch resume, the worker whose batches come next
        begin, end = worker_share(s.start, s.size, s.batches, self.batch_size, workers, role)
        skip = skips[role] * self.batch_size
        rng = random.Random(sample_seed(self.seed, epoch, 7919 * (self.rank * workers + role) + 1))
        last_good: tuple[int, str, bytes] | None = None
        for n, (position, index, name, data) in enumerate(self._shuffled(self._items(begin, end), rng)):
            if n < skip:
                continue
            try:
                image = load_rgb(io.BytesIO(data))
                last_good = (index, name, data)
            except unreadable_errors() as exc:
                image, index = self._bad(name, exc, last_good)
            target = self.targets[index]
            if self.target_transform is not None:
                target = self.target_transform(target)
            yield self._transformed(image, sample_seed(self.seed, epoch, position), info is None), target

    def _bad(self, name: str, exc: BaseException, last_good: tuple[int, str, bytes] | None) -> tuple[Any, int]:
        cause = f"{type(exc).__name__}: {exc}"
        if self.bad_images != "skip" or last_good is None:
            raise BadImageError(f"{name}: unreadable image ({cause})")
        with self.skipped.get_lock():
            self.skipped.value += 1
        sys.stderr.write(f"warning: skipping unreadable image {name} ({cause})\n")
        return load_rgb(io.BytesIO(last_good[2])), last_good[0]

    def _transformed(self, image: Any, seed: int, in_main: bool) -> Any:
        if self.transform is None:
            return image
        if not in_main:
            seed_sample(seed)
            return self.transform(image)
        state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:  # the training RNG streams stay untouched
            seed_sample(seed)
            return self.transform(image)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])
