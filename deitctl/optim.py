"""The optimizer and the learning-rate schedule, through timm's factories."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deitctl.errors import RecipeError
from deitctl.recipe import Recipe

IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "loop": {"foreach": False},
}


def scaled_lr(recipe: Recipe, world_size: int) -> float:
    """The recipe's lr under the linear scaling rule: global batch / ``lr_base_batch``."""
    o = recipe.optimizer
    if o.lr_scaling == "none":
        return o.lr
    return o.lr * recipe.data.batch_size * world_size * o.accumulate / o.lr_base_batch


def make_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``implementation = "auto"`` tries the fused kernel first."""
    from timm.optim import create_optimizer_v2

    o = recipe.optimizer
    kwargs: dict[str, Any] = {}
    if o.name.lower() in ("sgd", "nesterov", "momentum", "rmsprop", "rmsproptf"):
        kwargs["momentum"] = o.momentum
    if any(n in o.name.lower() for n in ("adam", "lamb", "lars", "nadam", "radam")):
        kwargs.update(betas=tuple(o.betas), eps=o.eps)
    auto = o.implementation == "auto"
    tries = [IMPLEMENTATIONS["fused"], {}] if auto else [IMPLEMENTATIONS[o.implementation]]
    for extra in tries:
        last = extra is tries[-1]
        try:
            return create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay, **kwargs, **extra)  # type: ignore[arg-type]
        except TypeError as exc:  # this optimizer has no such implementation flag
            if last and auto:
                raise RecipeError(
                    f"timm cannot make optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.name"
                ) from exc
            if last:
                raise RecipeError(
                    f'optimizer {o.name!r} has no {o.implementation!r} implementation ({exc}); use "auto"',
                    source=recipe.source,
                    key="optimizer.implementation",
                ) from exc
        except RuntimeError as exc:  # e.g. fused on a device that torch has no fused kernel for
            if not auto or last:
                raise RecipeError(
                    f"optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.implementation"
                ) from exc
        except (ValueError, AssertionError, KeyError) as exc:
            raise RecipeError(
                f"timm cannot make optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.name"
            ) from exc
    raise AssertionError("unreachable")


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    """``fused``, ``foreach``, ``loop`` or ``default``, as the optimizer was built (torch optimizers)."""
    defaults = getattr(optimizer, "defaults", {})
    if defaults.get("fused"):
        return "fused"
    if defaults.get("foreach") is False:
        return "loop"
    return "foreach" if defaults.get("foreach") else "default"


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    """timm's scheduler for ``[schedule]``: stepped every update, or every epoch (``interval``)."""
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    return create_scheduler_v2(
        optimizer,
        sched="step" if s.name == "const" else s.name,
        num_epochs=recipe.run.epochs,
        decay_epochs=recipe.run.epochs * 10 if s.name == "const" else s.decay_epochs,
        decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate,
        cooldown_epochs=s.cooldown_epochs,
        min_lr=s.min_lr,
        warmup_lr=s.warmup_lr,
        warmup_epochs=s.warmup_epochs,  # type: ignore[arg-type]  # timm takes fractional epochs
        step_on_epochs=s.interval in ("epoch", "official"),
        updates_per_epoch=updates_per_epoch,
    )[0]


def scheduler_epoch_after(recipe: Recipe, epoch: int) -> int:
    """The epoch the scheduler is stepped to once ``epoch`` (counted from 0) ends.

    ``interval = "epoch"``: to ``epoch + 1``, so epoch e trains at sched(e).
    ``"official"``: to ``epoch``, as the official ``main.py`` calls ``lr_scheduler.step(epoch)``,
    so epoch e trains at sched(e - 1) and the first two epochs at ``warmup_lr``.
    ``"update"``: the per-update steps set the lr; the epoch-level step changes nothing.
    """
    return epoch if recipe.schedule.interval == "official" else epoch + 1
