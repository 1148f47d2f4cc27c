"""Distillation strategies: none, soft, hard and token (DeiT).

Losses follow the paper (Touvron et al., 2021): eq. 2 for soft, eq. 3 for
hard, and the distillation token's head learning from the teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import deitctl
from deitctl.api import Criterion, Outputs, Register, Strategy

if TYPE_CHECKING:
    from torch import Tensor

KL_REDUCTIONS = ("batchmean", "official")


def _class_head(outputs: Outputs) -> Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _soft_kl(student: Tensor, teacher: Tensor, tau: float, reduction: str) -> Tensor:
    """τ²·KL(teacher/τ ‖ student/τ), per image ("batchmean", the paper) or per
    logit ("official": the official code divides by batch × classes)."""
    import torch.nn.functional as F

    kl = F.kl_div(
        F.log_softmax(student / tau, dim=1),
        F.log_softmax(teacher / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    denominator = student.shape[0] if reduction == "batchmean" else student.numel()
    return kl * (tau * tau) / denominator


def _hard_ce(student: Tensor, teacher: Tensor) -> Tensor:
    """CE against the teacher's argmax, without label smoothing."""
    import torch.nn.functional as F

    return F.cross_entropy(student, teacher.argmax(dim=1))


def _needs(teacher_logits: Tensor | None) -> Tensor:
    if teacher_logits is None:
        raise TypeError("this strategy needs the teacher's logits")
    return teacher_logits


def _check(alpha: float, tau: float, kl_reduction: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")


class NoDistillation(Strategy):
    uses_teacher = False

    def __call__(
        self, outputs: Outputs, targets: Tensor, teacher_logits: Tensor | None, base_criterion: Criterion
    ) -> Tensor:
        return base_criterion(_class_head(outputs), targets)


class SoftDistillation(Strategy):
    def __init__(self, alpha: float, tau: float, kl_reduction: str) -> None:
        self.alpha, self.tau, self.kl_reduction = alpha, tau, kl_reduction

    def __call__(
        self, outputs: Outputs, targets: Tensor, teacher_logits: Tensor | None, base_criterion: Criterion
    ) -> Tensor:
        s = _class_head(outputs)
        kd = _soft_kl(s, _needs(teacher_logits), self.tau, self.kl_reduction)
        return (1 - self.alpha) * base_criterion(s, targets) + self.alpha * kd


class HardDistillation(Strategy):
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(
        self, outputs: Outputs, targets: Tensor, teacher_logits: Tensor | None, base_criterion: Criterion
    ) -> Tensor:
        s = _class_head(outputs)
        return (1 - self.alpha) * base_criterion(s, targets) + self.alpha * _hard_ce(s, _needs(teacher_logits))


class TokenDistillation(Strategy):
    uses_dist_token = True

    def __init__(self, target: str, alpha: float, tau: float, kl_reduction: str) -> None:
        self.target, self.alpha, self.tau, self.kl_reduction = target, alpha, tau, kl_reduction

    def __call__(
        self, outputs: Outputs, targets: Tensor, teacher_logits: Tensor | None, base_criterion: Criterion
    ) -> Tensor:
        if not isinstance(outputs, tuple):
            raise TypeError("the token strategy needs (class, distillation) outputs from the student")
        cls, dist = outputs
        if self.target == "hard":
            kd = _hard_ce(dist, _needs(teacher_logits))
        else:
            kd = _soft_kl(dist, _needs(teacher_logits), self.tau, self.kl_reduction)
        return (1 - self.alpha) * base_criterion(cls, targets) + self.alpha * kd


def none() -> Strategy:
    """No teacher: the label loss alone."""
    return NoDistillation()


def soft(*, alpha: float = 0.1, tau: float = 3.0, kl_reduction: str = "batchmean") -> Strategy:
    """(1−α)·CE(y) + α·τ²·KL, on the class head (paper: α = 0.1, τ = 3)."""
    _check(alpha, tau, kl_reduction)
    return SoftDistillation(alpha, tau, kl_reduction)


def hard(*, alpha: float = 0.5) -> Strategy:
    """(1−α)·CE(y) + α·CE(argmax teacher), on the class head (paper: α = ½)."""
    _check(alpha, 1.0, "batchmean")
    return HardDistillation(alpha)


def token(*, target: str = "hard", alpha: float = 0.5, tau: float = 3.0, kl_reduction: str = "batchmean") -> Strategy:
    """DeiT: class head on the labels, distillation token's head on the teacher."""
    if target not in ("hard", "soft"):
        raise ValueError(f"target must be 'hard' or 'soft', got {target!r}")
    _check(alpha, tau, kl_reduction)
    return TokenDistillation(target, alpha, tau, kl_reduction)


@deitctl.hookimpl
def register_strategies(register: Register) -> None:
    register("none", none, help="no distillation: cross-entropy on the labels")
    register("soft", soft, help="soft distillation on the class head (paper eq. 2: α=0.1, τ=3)")
    register("hard", hard, help="hard-label distillation on the class head (paper eq. 3)")
    register("token", token, help="DeiT distillation token: class head on labels, dist head on the teacher")
