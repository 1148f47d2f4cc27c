"""Teachers: any timm model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import deitctl
from deitctl.api import Register

if TYPE_CHECKING:
    from torch import nn


def timm_teacher(
    *, num_classes: int, model: str = "regnety_160", pretrained: bool = False, **options: Any
) -> nn.Module:
    """A timm model; ``pretrained = true`` downloads timm's weights, extra keys go
    to ``timm.create_model`` (deitctl loads ``checkpoint`` itself)."""
    import timm

    return timm.create_model(model, pretrained=pretrained, num_classes=num_classes, **options)


@deitctl.hookimpl
def register_teachers(register: Register) -> None:
    register("timm", timm_teacher, help="any timm model (the paper's: regnety_160)")
