"""Samplers: a seeded order per epoch, repeated augmentation, shares per process, and each
sample's augmentation seed from (run seed, epoch, global position)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + position) % (2**31 - 1)


class _EpochSampler(Sampler[int]):
    """A seeded shuffle per epoch, shared out over ``num_replicas`` processes."""

    def __init__(self, size: int, *, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        self.size, self.seed, self.num_replicas, self.rank, self.shuffle, self.epoch = (
            size,
            seed,
            num_replicas,
            rank,
            shuffle,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_position(self, local: int) -> int:
        """Where this process's ``local``-th sample stands in the epoch's global order."""
        return local * self.num_replicas + self.rank

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()


class RepeatedAugSampler(_EpochSampler):
    """The official DeiT RASampler (with a seed): each image ``repeats`` times per
    epoch, spread over the processes, epoch length of one pass over the data."""

    def __init__(
        self, size: int, *, repeats: int, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True
    ):
        super().__init__(size, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=shuffle)
        self.repeats = repeats
        self.num_samples = math.ceil(size * repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        rounded = size // 256 * 256
        self.num_selected = rounded // num_replicas if rounded else math.ceil(size / num_replicas)

    def __iter__(self) -> Iterator[int]:
        indices = [i for i in self._order() for _ in range(self.repeats)]
        indices += indices[: self.total_size - len(indices)]
        return iter(indices[self.rank : self.total_size : self.num_replicas][: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected


class ShuffleSampler(_EpochSampler):
    """Split over processes like DistributedSampler. Training pads to equal
    shares; evaluation (``pad=False``) gives each image to exactly one process,
    so totals are exact."""

    def __init__(
        self, size: int, *, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, pad: bool = True
    ):
        super().__init__(size, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=shuffle)
        self.pad = pad
        self.num_samples = math.ceil(size / num_replicas) if pad else len(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad:
            order += order[: self.num_samples * self.num_replicas - len(order)]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields (index, seed) pairs, skipping ``skip`` samples (mid-epoch resume)."""

    def __init__(self, base: Sampler[int], seed: int):
        self.base, self.seed, self.epoch, self.skip = base, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]

    def set_rank(self, rank: int) -> None:
        """Yield process ``rank``'s share from now on (``deitctl teach`` replays every
        process's stream in one; a share's length does not depend on the rank)."""
        self.base.rank = rank  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        to_global = getattr(self.base, "global_position", lambda p: p)
        for position, index in enumerate(self.base):
            if position >= self.skip:  # seeds follow the global position: any process count, same augmentation
                yield index, sample_seed(self.seed, self.epoch, to_global(position))

    def __len__(self) -> int:
        return len(self.base) - self.skip  # type: ignore[arg-type]
