"""Augmentations: DeiT's (timm's RandAugment, random erasing, Mixup/CutMix),
DeiT III's three-augment, and a simple crop-and-flip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import deitctl
from deitctl.api import Augmentation, Register, as_tuple, make_mixup

if TYPE_CHECKING:
    from PIL import Image
    from torchvision import transforms


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, safe on Pillow >= 13, which refuses 0 bits (timm's
    PosterizeIncreasing asks for 0 at full magnitude; older Pillow gave black)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize() -> None:
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> transforms.Compose:
    """Resize by 1/crop_pct and centre-crop (the official DeiT evaluation);
    images of 32 px or less are only normalised, as in the official code."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T

    steps = []
    if img_size > 32:
        steps += [
            T.Resize(int(img_size / crop_pct), interpolation=str_to_interp_mode(interpolation)),
            T.CenterCrop(img_size),
        ]
    else:
        steps.append(T.Resize((img_size, img_size), interpolation=str_to_interp_mode(interpolation)))
    steps += [T.ToTensor(), T.Normalize(as_tuple(mean), as_tuple(std))]
    return T.Compose(steps)


def _small_crop(transform: transforms.Compose, img_size: int, padding: int) -> transforms.Compose:
    """The official code's swap for small images: a padded random crop instead of
    the random-resized crop."""
    from torchvision import transforms as T

    transform.transforms[0] = T.RandomCrop(img_size, padding=padding)
    return transform


def deit(
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.3,
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    mixup_mode: str = "batch",
    smoothing: float = 0.1,
    crop_pct: float = 0.875,
    small_crop_padding: int = 4,
) -> Augmentation:
    """The official DeiT training augmentation (paper Table 9)."""
    from timm.data import create_transform

    _patch_posterize()
    train = create_transform(
        img_size,
        is_training=True,
        scale=(float(scale[0]), float(scale[1])),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=as_tuple(mean),
        std=as_tuple(std),
    )
    if img_size <= 32:
        train = _small_crop(train, img_size, small_crop_padding)
    mix = make_mixup(
        mixup=mixup,
        cutmix=cutmix,
        prob=mixup_prob,
        switch_prob=mixup_switch_prob,
        mode=mixup_mode,
        smoothing=smoothing,
        num_classes=num_classes,
    )
    return Augmentation(train, eval_transform(img_size, mean, std, crop_pct, interpolation), mix, smoothing)


class _Solarize:
    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageOps

        return ImageOps.solarize(img)


def three_augment(
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    scale: tuple[float, float] = (0.08, 1.0),
    simple_crop: bool = False,
    color_jitter: float = 0.3,
    hflip: float = 0.5,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    mixup_mode: str = "batch",
    smoothing: float = 0.1,
    crop_pct: float = 0.875,
) -> Augmentation:
    """DeiT III's 3-Augment: grayscale, solarization or blur, then colour jitter."""
    from torchvision import transforms as T

    if simple_crop or img_size <= 32:
        crop = [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(img_size, padding=4, padding_mode="reflect"),
        ]
    else:
        crop = [T.RandomResizedCrop(img_size, scale=as_tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    steps = crop + [
        T.RandomHorizontalFlip(hflip),
        T.RandomChoice([T.Grayscale(num_output_channels=3), _Solarize(), T.GaussianBlur(5, sigma=(0.1, 2.0))]),
    ]
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(as_tuple(mean), as_tuple(std))]
    mix = make_mixup(
        mixup=mixup,
        cutmix=cutmix,
        prob=mixup_prob,
        switch_prob=mixup_switch_prob,
        mode=mixup_mode,
        smoothing=smoothing,
        num_classes=num_classes,
    )
    return Augmentation(T.Compose(steps), eval_transform(img_size, mean, std, crop_pct), mix, smoothing)


def simple(
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    padding: int = 4,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    mixup_mode: str = "batch",
    smoothing: float = 0.1,
    crop_pct: float = 0.875,
) -> Augmentation:
    """Random-resized crop (a padded crop at 32 px or less) and a horizontal flip."""
    from torchvision import transforms as T

    if img_size <= 32:
        crop = [T.Resize((img_size, img_size)), T.RandomCrop(img_size, padding=padding)]
    else:
        crop = [T.RandomResizedCrop(img_size, scale=as_tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    steps = crop + [T.RandomHorizontalFlip(hflip), T.ToTensor(), T.Normalize(as_tuple(mean), as_tuple(std))]
    mix = make_mixup(
        mixup=mixup,
        cutmix=cutmix,
        prob=mixup_prob,
        switch_prob=mixup_switch_prob,
        mode=mixup_mode,
        smoothing=smoothing,
        num_classes=num_classes,
    )
    return Augmentation(T.Compose(steps), eval_transform(img_size, mean, std, crop_pct), mix, smoothing)


@deitctl.hookimpl
def register_augmentations(register: Register) -> None:
    register("deit", deit, help="RandAugment m9/0.5, erasing 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1")
    register("three_augment", three_augment, help="DeiT III 3-Augment (grayscale/solarize/blur + jitter)")
    register("simple", simple, help="random-resized crop and flip")
