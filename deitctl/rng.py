"""Every random number generator a run draws from: seeding, state as checkpoint data, blocks that
leave the global generators untouched, and the seeded batch transform."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG, as tensors and plain data (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def kept_rng(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Run the block and leave python's, numpy's and torch's global generators (CPU, and the
    CUDA ``devices``) where they were, whatever the block draws."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one training batch's transform (Mixup/CutMix) in one process: a hash of the
    four numbers (numpy's SeedSequence), different for every batch of a run."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def seeded_batch(
    transform: Callable[[Any, Any], tuple[Any, Any]], images: torch.Tensor, targets: torch.Tensor, seed: int
) -> tuple[Any, Any]:
    """``transform(images, targets)`` drawing from generators seeded with ``seed`` (python,
    numpy and torch, on the batch's device too), which are left as they were afterwards: the
    batch's Mixup/CutMix decisions depend on (seed, epoch, step, rank) only, never on what
    the student drew before (drop-path masks), so a teacher-output cache can replay them."""
    with kept_rng([images.device]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        if images.device.type == "cuda":
            with torch.cuda.device(images.device):
                torch.cuda.manual_seed(seed)
        return transform(images, targets)
