"""deitctl-acme-teacher: the ACME in-house CNN as a deitctl teacher.

A complete third-party deitctl plugin. The entry point in ``pyproject.toml``::

    [project.entry-points.deitctl]
    acme = "deitctl_acme_teacher"

makes deitctl import this module and call its hook implementations. This one
registers a teacher named ``acme-cnn`` (and the same network as a student, so
that deitctl can train the teacher when you have no weights yet).

Recipe::

    [teacher]
    plugin = "acme-cnn"
    width = 32                       # options: keyword arguments of acme_cnn()
    depth = 3
    checkpoint = "runs/acme_teacher/best.pt"   # loaded by deitctl
"""

from __future__ import annotations

import deitctl
import torch
from torch import nn

__version__ = "0.1.0"

__all__ = ["AcmeCNN", "acme_cnn", "register_students", "register_teachers"]


def _conv_bn_relu(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class AcmeCNN(nn.Module):
    """A small VGG-style CNN: a stem, ``depth`` conv-bn-relu stages that double the
    width and halve the resolution (the first stage keeps it), a global average
    pool and a linear classifier. Maps ``[B, 3, H, W]`` to logits ``[B, num_classes]``
    for any ``H, W``."""

    def __init__(self, num_classes: int, width: int = 32, depth: int = 3, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = _conv_bn_relu(in_chans, width)
        stages, chans = [], width
        for i in range(depth):
            out = width * 2**i
            stages.append(nn.Sequential(_conv_bn_relu(chans, out, stride=1 if i == 0 else 2), _conv_bn_relu(out, out)))
            chans = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def acme_cnn(*, num_classes: int, width: int = 32, depth: int = 3) -> AcmeCNN:
    """The factory deitctl calls.

    ``num_classes`` comes from deitctl (the dataset's class count). Every other
    keyword is a recipe option: deitctl checks recipe keys against this
    signature (an unknown key is an error listing ``width, depth``), checks
    their types against the defaults, and shows the defaults in
    ``deitctl recipe show``. Raising ``ValueError`` here becomes a recipe error
    that names the ``[teacher]`` section.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    return AcmeCNN(num_classes=num_classes, width=width, depth=depth)


@deitctl.hookimpl
def register_teachers(register):
    register("acme-cnn", acme_cnn, help="ACME in-house CNN (conv-bn-relu stages, global pool, linear)")


@deitctl.hookimpl
def register_students(register):
    # Optional: the same network as a student, so `deitctl train` can train the
    # teacher itself (strategy "none") when you do not have ACME weights yet.
    register("acme-cnn", acme_cnn, help="ACME in-house CNN (to train it as a teacher, strategy none)")
