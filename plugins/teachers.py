"""Teachers: any timm model."""

from __future__ import annotations

import deitctl


def timm_teacher(*, num_classes: int, model: str = "regnety_160", pretrained: bool = False, **options):
    """A timm model; ``pretrained = true`` downloads timm's weights, extra keys go
    to ``timm.create_model`` (deitctl loads ``checkpoint`` itself)."""
    import timm

    return timm.create_model(model, pretrained=pretrained, num_classes=num_classes, **options)


@deitctl.hookimpl
def register_teachers(register):
    register("timm", timm_teacher, help="any timm model (the paper's: regnety_160)")
