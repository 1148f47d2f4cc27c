"""Batches that cross between processes as bytes: a transform ending in ``ToTensor(),
Normalize(...)`` (and optionally timm's ``RandomErasing``) stops at a uint8 tensor; the
batch is scaled, normalised and erased a batch at a time, on the device when there is one,
bit for bit as the per-image steps would have made it.

Erasing is decided in the worker, by timm's own ``RandomErasing`` under the sample's seed,
on a stand-in that records each rectangle and its noise instead of writing it; the
rectangles are written into the normalised batch (:class:`ErasePatches`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Subset


def base_and_indices(dataset: Any) -> tuple[Any, list[int]]:
    """The dataset under any Subsets, and the indices into it that ``dataset`` uses."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _byte_image(pic: Any) -> bool:
    """A PIL image that ToTensor turns into bytes ÷ 255 (not modes 1, I*, F)."""
    from PIL import Image

    return isinstance(pic, Image.Image) and pic.mode != "1" and not pic.mode.startswith(("I", "F"))


class _Recorder:
    """Stands in for a [C, H, W] float image under timm's RandomErasing: keeps what it writes."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape, self.dtype = torch.Size(shape), torch.get_default_dtype()
        self.patches: list[tuple[Any, torch.Tensor]] = []

    def size(self) -> torch.Size:
        return self.shape

    def __setitem__(self, key: Any, value: torch.Tensor) -> None:
        self.patches.append((key, value))


class ErasePatches(list):
    """A batch's erased rectangles: (sample, index, values) to write into the normalised images."""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        for sample, key, values in self:
            images[sample][key] = values.to(images.device, images.dtype)
        return images


class ToUint8Tensor:
    """Ends a transform in place of ``ToTensor(), Normalize(mean, std)`` [``, RandomErasing``]:
    8-bit images stay bytes, [H, W, C] (a quarter of the floats to pass between processes), carrying
    their erased rectangles in ``.erase_patches``, to be finished a batch at a time by
    :class:`deitctl.data.Loader`; anything else goes through the original steps."""

    def __init__(self, to_tensor: Callable[[Any], Any], normalize: Any, erasing: Callable[[Any], Any] | None = None):
        self.to_tensor, self.normalize, self.erasing = to_tensor, normalize, erasing
        self.mean, self.std = tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))

    def __call__(self, pic: Any) -> Any:
        if not _byte_image(pic):
            out = self.normalize(self.to_tensor(pic))
            return self.erasing(out) if self.erasing is not None else out
        w, h = pic.size  # height x width x channels, as PIL holds them: transposed a batch at a time
        image = torch.frombuffer(bytearray(pic.tobytes()), dtype=torch.uint8).view(h, w, -1)
        if self.erasing is not None:
            recorder = _Recorder((image.shape[2], h, w))
            self.erasing(recorder)
            if recorder.patches:
                image.erase_patches = recorder.patches  # type: ignore[attr-defined]
        return image

    def __repr__(self) -> str:
        then = ", RandomErasing" if self.erasing is not None else ""
        return f"{type(self).__name__}(then per batch: ToTensor, Normalize(mean={self.mean}, std={self.std}){then})"


def _erasing(step: Any) -> bool:
    """timm's RandomErasing on the CPU (the erasing of timm's create_transform)."""
    from timm.data.random_erasing import RandomErasing

    return type(step) is RandomErasing and str(step.device) == "cpu"


def defer_normalize(dataset: Any) -> ToUint8Tensor | None:
    """Where ``dataset``'s transform is a Compose ending in ``ToTensor(), Normalize(...)``
    (timm's ``MaybeToTensor`` too), or those and timm's ``RandomErasing``, replace them by
    :class:`ToUint8Tensor`; returns it (None where the transform is anything else)."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    base, _ = base_and_indices(dataset)
    transform = getattr(base, "transform", None)
    if not isinstance(transform, T.Compose) or len(transform.transforms) < 2:
        return None
    steps = list(transform.transforms)
    if isinstance(steps[-1], ToUint8Tensor):
        return steps[-1]
    erasing = steps.pop() if _erasing(steps[-1]) else None
    if len(steps) < 2:
        return None
    *head, to_tensor, normalize = steps
    if type(to_tensor) not in (T.ToTensor, MaybeToTensor) or type(normalize) is not T.Normalize or normalize.inplace:
        return None
    last = ToUint8Tensor(to_tensor, normalize, erasing)
    base.transform = T.Compose([*head, last])
    return last


def finish_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images, [H, W, C] or a batch [B, H, W, C], to what ToTensor then Normalize give
    ([C, H, W] or [B, C, H, W], contiguous), bit for bit."""
    chw = images.movedim(-1, -3)
    out = torch.empty(chw.shape, dtype=torch.get_default_dtype(), device=images.device)
    return out.copy_(chw).div_(255).sub_(mean).div_(std)


class Collate:
    """default_collate, plus the batch's :class:`ErasePatches` after the other fields.
    In a batch that also holds images only the original steps could convert (modes 1, I,
    F), the 8-bit ones are finished here."""

    def __init__(self, last: ToUint8Tensor):
        self.mean = torch.tensor(last.mean).view(-1, 1, 1)
        self.std = torch.tensor(last.std).view(-1, 1, 1)

    def __call__(self, batch: list[Any]) -> Any:
        from torch.utils.data import default_collate

        if not (batch and isinstance(batch[0], (tuple, list)) and isinstance(batch[0][0], torch.Tensor)):
            return default_collate(batch)
        patches = ErasePatches(
            (i, key, values) for i, s in enumerate(batch) for key, values in getattr(s[0], "erase_patches", ())
        )
        dtypes = {sample[0].dtype for sample in batch}
        if torch.uint8 in dtypes and len(dtypes) > 1:
            batch = [
                (finish_images(s[0], self.mean, self.std), *s[1:]) if s[0].dtype == torch.uint8 else s for s in batch
            ]
            images, *rest = default_collate(batch)
            return (patches.apply(images), *rest)
        return (*default_collate(batch), patches)
