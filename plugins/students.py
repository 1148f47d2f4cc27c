"""Students: the DeiT family from timm, and any timm model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import deitctl
from deitctl.api import Register

if TYPE_CHECKING:
    from torch import nn


def deit(
    *,
    num_classes: int,
    img_size: int,
    model: str = "deit_small_distilled_patch16_224",
    pretrained: bool = False,
    drop_path: float = 0.1,
    drop: float = 0.0,
    **options: Any,
) -> nn.Module:
    """A DeiT from timm (plain or distilled); extra keys such as ``patch_size``,
    ``depth``, ``embed_dim`` or ``num_heads`` go to ``timm.create_model``."""
    import timm

    if not model.startswith("deit"):
        raise ValueError(f'{model!r} is not a DeiT model; use plugin = "timm" for other timm models')
    return timm.create_model(
        model,
        pretrained=pretrained,
        num_classes=num_classes,
        img_size=img_size,
        drop_path_rate=drop_path,
        drop_rate=drop,
        **options,
    )


def timm_student(
    *, num_classes: int, model: str, pretrained: bool = False, drop_path: float = 0.0, drop: float = 0.0, **options: Any
) -> nn.Module:
    """Any timm model (for the none, soft and hard strategies); extra keys go to ``timm.create_model``."""
    import timm

    return timm.create_model(
        model, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path, drop_rate=drop, **options
    )


@deitctl.hookimpl
def register_students(register: Register) -> None:
    register("deit", deit, help="DeiT from timm, plain or with a distillation token")
    register("timm", timm_student, help="any timm model (strategies none, soft, hard)")
