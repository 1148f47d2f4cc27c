"""A training run's state as a checkpoint holds it: weights, EMA, optimizer, schedule,
scaler, every process' RNG streams, and where the run stands. Captured at a commit, restored
on ``--resume``; a mid-epoch checkpoint also records the steps done and their partial sums,
per process, so a resumed run gives the uninterrupted run's figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.assembly import Parts
from deitctl.distributed import World, gather_to_all
from deitctl.errors import UserError
from deitctl.recipe import Recipe
from deitctl.rng import rng_state, set_rng_state
from deitctl.rundir import checkpoint_payload
from deitctl.tomlio import parse_toml


@dataclass
class Position:
    """Where the run stands: what a checkpoint restores besides the weights."""

    start_epoch: int = 0
    best_acc1: float = -1.0
    num_updates: int = 0
    skipped_steps: int = 0
    resume_step: int = 0
    """Steps of ``start_epoch`` already done (a mid-epoch resume)."""
    resume_partial: dict[str, float] = field(default_factory=dict)
    """Their loss sum, image count and time, in this process."""


@dataclass
class TrainState:
    """The parts of a run that a checkpoint holds, and its position."""

    recipe: Recipe
    parts: Parts
    world: World
    student: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    position: Position = field(default_factory=Position)
    saved_recipe: str = ""
    """The recipe text of the checkpoint last restored."""

    def capture(
        self, epoch: int, metrics: dict[str, Any], *, resume_step: int = 0, partial: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (the last finished one) and, mid-epoch, after
        ``resume_step`` steps of the next. Collective under DDP (every rank's RNG states and
        partial sums go in): call it on every rank."""
        p, pos = self.parts, self.position
        ranks = gather_to_all({"rng": rng_state(), "partial": dict(partial or {})})
        payload = checkpoint_payload(
            model=self.student.state_dict(),
            model_ema=self.ema.module.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            num_updates=pos.num_updates,
            best_acc1=pos.best_acc1,
            metrics=metrics,
            rng=ranks[0]["rng"],
            recipe=self.recipe,
            classes=p.classes,
            mean=p.mean,
            std=p.std,
        )
        if self.world.distributed:
            payload["ranks"] = ranks
        if resume_step:
            payload.update(resume_step=resume_step, resume_partial=ranks[0]["partial"])
        return payload

    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Weights, optimizer, schedule, scaler, this process' RNG streams and the position."""
        try:
            self.student.load_state_dict(ckpt["model"])
            if self.ema is not None and ckpt.get("model_ema"):
                self.ema.module.load_state_dict(ckpt["model_ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler.is_enabled() and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"{path}: cannot resume this recipe from it ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        resume_step = int(ckpt.get("resume_step", 0))
        rng, partial = ckpt["rng"], dict(ckpt.get("resume_partial", {}))
        ranks = ckpt.get("ranks") or []
        world_size, saved_by = self.world.world_size, max(len(ranks), 1)
        if len(ranks) == world_size:
            rng, partial = ranks[self.world.rank]["rng"], dict(ranks[self.world.rank]["partial"])
        elif resume_step and world_size != saved_by:
            raise UserError(
                f"{path}: saved in the middle of an epoch by {saved_by} process(es); resume it with as many "
                f"(this run has {world_size})"
            )
        self.position = Position(
            start_epoch=int(ckpt["epoch"]) + 1,
            best_acc1=float(ckpt.get("best_acc1", -1.0)),
            num_updates=int(ckpt.get("num_updates", 0)),
            resume_step=resume_step,
            resume_partial=partial,
        )
        self.saved_recipe = str(ckpt.get("recipe", ""))
        set_rng_state(rng)

    def changed_settings(self) -> list[str]:
        """Optimizer and schedule keys that differ from the restored checkpoint's recipe:
        their state comes from the checkpoint, so the new values do not apply to it."""
        try:
            saved = parse_toml(self.saved_recipe, "checkpoint")
        except Exception:
            return []
        now = self.recipe.to_dict()
        changed = [
            f"{section}.{key}"
            for section in ("optimizer", "schedule")
            for key, value in now.get(section, {}).items()
            if saved.get(section, {}).get(key, value) != value
        ]
        if saved.get("run", {}).get("epochs", self.recipe.run.epochs) != self.recipe.run.epochs:
            changed.append("run.epochs")
        return changed
