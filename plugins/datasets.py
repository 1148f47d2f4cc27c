"""Datasets: an ImageFolder tree, and synthetic tensors for benchmarks and smoke tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deitctl
from deitctl.api import IMAGE_EXTENSIONS, Register, load_rgb

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torchvision.datasets import ImageFolder

Transform = Callable[[Any], Any]


def _rgb_loader(path: str) -> Image.Image:
    """Any image file as RGB (:func:`deitctl.api.load_rgb`)."""
    with open(path, "rb") as f:
        return load_rgb(f)


def imagefolder(*, root: str, split: str, transform: Transform | None = None) -> ImageFolder:
    """``root/<split>/<class>/<image>``; class names come from the folders."""
    from torchvision.datasets import ImageFolder

    path = Path(root) / split
    if not path.is_dir():
        if (Path(root) / "manifest.json").is_file():
            raise FileNotFoundError(
                f'{root!r} holds packed shards, not an ImageFolder: use data.dataset = "webdataset"'
            )
        if Path(root).is_dir() and not any(p.is_dir() for p in Path(root).iterdir()):
            raise FileNotFoundError(
                f"{root!r} holds neither an ImageFolder ({root}/<split>/<class>/<image>) nor packed shards "
                "(manifest.json of `deitctl data pack`)"
            )
        raise FileNotFoundError(f"no split folder {str(path)!r}")
    dataset = ImageFolder(
        str(path),
        transform=transform,
        loader=_rgb_loader,
        is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS),
        allow_empty=True,
    )
    if not dataset.samples:
        raise FileNotFoundError(f"no images under {str(path)!r} (expected {path}/<class>/<image>)")
    return dataset


class SyntheticImages:
    """Deterministic random images (already normalised tensors) and labels."""

    def __init__(self, length: int, num_classes: int, img_size: int, seed: int):
        self.length, self.img_size, self.seed = length, img_size, seed
        self.classes = [f"class_{i}" for i in range(num_classes)]
        self.targets = [(i * 7919 + seed) % num_classes for i in range(length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(3, self.img_size, self.img_size, generator=g), self.targets[index]


def synthetic(
    *, split: str, img_size: int, num_classes: int, length: int = 1024, transform: Transform | None = None
) -> SyntheticImages:
    """Random tensors of the recipe's shape and class count (transforms are not applied)."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    return SyntheticImages(length, num_classes or 1000, img_size, seed=0 if split == "train" else 1)


@deitctl.hookimpl
def register_datasets(register: Register) -> None:
    register("imagefolder", imagefolder, help="root/<split>/<class>/<image> (ImageNet layout)")
    register("synthetic", synthetic, help="random tensors of the recipe's shape (benchmarks, smoke tests)")
