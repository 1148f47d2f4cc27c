"""The frozen teacher: re-normalises and resizes the student's batch, never trains."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FrozenTeacher(nn.Module):
    """Wraps a teacher module: eval mode, no gradients, its own input statistics and size."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        in_mean: Sequence[float],
        in_std: Sequence[float],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int = 0,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.mean, self.std, self.input_size = tuple(map(float, mean)), tuple(map(float, std)), input_size
        self.renormalize = tuple(map(float, in_mean)) != self.mean or tuple(map(float, in_std)) != self.std
        t_in_mean, t_in_std = torch.tensor(in_mean).view(1, 3, 1, 1), torch.tensor(in_std).view(1, 3, 1, 1)
        t_mean, t_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        # x_teacher = (x * in_std + in_mean - mean) / std = x * scale + shift
        self.register_buffer("scale", t_in_std / t_std, persistent=False)
        self.register_buffer("shift", (t_in_mean - t_mean) / t_std, persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        logits: torch.Tensor = self.model(x)
        return logits
