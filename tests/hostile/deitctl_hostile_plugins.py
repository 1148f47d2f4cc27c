"""Hostile and helper plugins for tests/test_reliability.py, loaded with
``DEITCTL_PLUGINS=deitctl_hostile_plugins`` (this folder on ``sys.path``).

Teachers and students that fail in the ways third-party code does, and a
``slow_deit`` augmentation: the built-in DeiT augmentation, unchanged, whose
training transform sleeps a little per image, so that a signal sent to a
short test run lands while it trains, and waits while a ``hold`` file exists,
so that a test decides when training starts (neither touches random state).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

import deitctl


class _Logits(nn.Module):
    """A tiny real classifier whose logits have ``extra`` columns too many."""

    def __init__(self, num_classes: int, extra: int = 0):
        super().__init__()
        self.fc = nn.Linear(3, num_classes + extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def boom_teacher(*, num_classes: int, **options):
    """A factory that raises."""
    raise ValueError("boom")


def dict_teacher(*, num_classes: int, **options):
    """A factory that returns something other than a torch.nn.Module."""
    return {"num_classes": num_classes}


def wide_teacher(*, num_classes: int, **options):
    """A module whose logits have one class too many: [B, num_classes + 1]."""
    return _Logits(num_classes, extra=1)


def wide_student(*, num_classes: int, img_size: int = 32, **options):
    """A student whose logits have one class too many: [B, num_classes + 1]."""
    return _Logits(num_classes, extra=1)


class _Sleepy:
    def __init__(self, transform, delay: float, hold: str):
        self.transform, self.delay, self.hold = transform, delay, hold

    def __call__(self, img):
        while self.hold and os.path.exists(self.hold):
            time.sleep(0.01)
        if self.delay:
            time.sleep(self.delay)
        return self.transform(img)


def slow_deit(*, img_size: int, mean, std, num_classes: int, delay: float = 0.0, hold: str = "", **options):
    """The built-in ``deit`` augmentation; its training transform sleeps ``delay`` s per
    image, and waits while the file ``hold`` exists."""
    from deitctl.api import Augmentation
    from deitctl_plugins.augmentations import deit

    aug = deit(img_size=img_size, mean=mean, std=std, num_classes=num_classes, **options)
    return Augmentation(
        _Sleepy(aug.train_transform, delay, hold), aug.eval_transform, aug.batch_transform, aug.smoothing
    )


@deitctl.hookimpl
def register_teachers(register):
    register("hostile-boom", boom_teacher, help="raises ValueError('boom')")
    register("hostile-dict", dict_teacher, help="returns a dict, not a module")
    register("hostile-wide", wide_teacher, help="logits of shape [B, num_classes + 1]")


@deitctl.hookimpl
def register_students(register):
    register("hostile-wide", wide_student, help="logits of shape [B, num_classes + 1]")


@deitctl.hookimpl
def register_augmentations(register):
    register("slow_deit", slow_deit, help="the deit augmentation, sleeping per training image")
