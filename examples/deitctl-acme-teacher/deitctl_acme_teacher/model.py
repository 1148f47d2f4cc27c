"""The ACME in-house CNN (imported only when deitctl builds it)."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class AcmeCNN(nn.Module):
    """A small VGG-style CNN: a stem, ``depth`` stages of two conv-bn-relu blocks
    that double the width and halve the resolution (the first stage keeps both),
    a global average pool and a linear classifier.

    Maps a normalised batch ``[B, 3, H, W]`` (any ``H, W``) to logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int, width: int = 32, depth: int = 3, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = conv_bn_relu(in_chans, width)
        stages, chans = [], width
        for i in range(depth):
            out = width * 2**i
            stages.append(nn.Sequential(conv_bn_relu(chans, out, stride=1 if i == 0 else 2), conv_bn_relu(out, out)))
            chans = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))
