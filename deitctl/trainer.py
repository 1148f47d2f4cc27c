"""The training loop, read top to bottom: setup methods, then fit, epoch, step and update."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.assembly import Parts, assemble
from deitctl.compiler import compile_module
from deitctl.distributed import World, all_reduce_sum, any_rank
from deitctl.errors import RunError, UserError
from deitctl.evaluation import evaluate
from deitctl.events import Reporter, StepClock, StopRequest
from deitctl.factories import build_teacher, check_output, has_dist_token
from deitctl.optim import make_optimizer, make_scheduler, optimizer_implementation, scaled_lr, scheduler_epoch_after
from deitctl.recipe import Recipe
from deitctl.rng import batch_seed, seed_everything, seeded_batch
from deitctl.rundir import RunDir
from deitctl.runtime import autocast_factory, configure_process, set_attention
from deitctl.teacher_source import LiveTeacher, TeacherSource, cached_source
from deitctl.train_state import Position, TrainState
from deitctl.tuning import KEYS, Tuning, broadcast, resolve_speed


@dataclass
class TrainResult:
    output_dir: Path
    best_acc1: float
    last: dict[str, Any]
    epochs_run: int


class Trainer:
    """One training run: a recipe's parts, assembled once, and the loop that trains them."""

    def __init__(
        self, recipe: Recipe, reporter: Reporter | None = None, *, world: World | None = None, tune: bool = False
    ) -> None:
        """``tune``: first measure every speed candidate, as if each speed key were ``"auto"``
        (``deitctl benchmark --tune``; :attr:`tuned` holds the table)."""
        self.recipe, self.reporter = recipe, reporter or Reporter()
        self.world = world or World()
        self.rank, self.world_size = self.world.rank, self.world.world_size
        self.out = recipe.output_dir
        self.run_dir = RunDir(self.out, is_main=self.world.is_main)
        seed_everything(recipe.run.seed + self.rank)
        t = recipe.teacher
        self.cache = t.cache if recipe.uses_teacher and t is not None else ""
        self.parts: Parts = assemble(recipe, world=self.world, with_teacher=recipe.uses_teacher and not self.cache)
        self.device = self.parts.device
        self.clock = StepClock(self.device)
        self._setup_speed(tune)
        self._setup_models()
        self._setup_optimization()
        self.train_state = TrainState(
            self.recipe, self.parts, self.world, self.student, self.ema, self.optimizer, self.scheduler, self.scaler
        )

    # ---------------------------------------------------------------- setup

    def _setup_speed(self, tune: bool) -> None:
        """Process-wide settings, then the speed settings: the recipe's, or for ``"auto"``
        measured on this machine (:mod:`deitctl.tuning`; rank 0 decides)."""
        r, p = self.recipe, self.parts
        self.retains_host_memory = configure_process(r.run.threads, r.run.retain_host_memory)
        tuning, self.tuned = None, None
        shape = dict(
            batch=(r.data.batch_size, 3, r.data.img_size, r.data.img_size),
            num_classes=p.num_classes,
            total_steps=r.run.epochs * len(p.train_loader),
        )
        if tune:
            every = dataclasses.replace(r.run, **dict.fromkeys(KEYS, "auto"))  # type: ignore[arg-type]
            self.tuned = resolve_speed(every, self.device, p.student, p.teacher, retune=True, **shape)  # type: ignore[arg-type]
        if self.world.is_main:
            fixed = ""
            if self.cache and r.run.precision == "auto":  # the cached logits' precision
                from deitctl.teacher_cache import cache_precision

                fixed = cache_precision(Path(self.cache))
            tuning = resolve_speed(
                r.run,
                self.device,
                p.student,
                p.teacher,
                fixed_precision=fixed,
                log=self.reporter.log,
                source=r.source,
                **shape,  # type: ignore[arg-type]
            )
        self.tuning: Tuning = broadcast(tuning)
        s = self.tuning.speed
        self.precision, self.attention, self.gelu_backward = s.precision, s.attention, s.gelu_backward
        self.compile, self.channels_last = s.compile, s.channels_last
        self.autocast = autocast_factory(self.device, self.precision)

    def _setup_models(self) -> None:
        """Student and teacher on the device with the speed settings; EMA, compile, DDP."""
        p = self.parts
        self.student = p.student.to(self.device)
        set_attention(self.student, self.attention)
        if self.gelu_backward == "saved":
            from deitctl.activations import save_gelu_derivative

            save_gelu_derivative(self.student)
        if has_dist_token(self.student):
            self.student.set_distilled_training(True)  # type: ignore[operator]
        self.teacher: nn.Module | None = None
        self.teachers: TeacherSource | None = self._live_teacher(p.teacher) if p.teacher is not None else None
        self.ema = None
        if self.recipe.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=self.recipe.ema.decay, use_warmup=self.recipe.ema.warmup)
        self.forward: nn.Module = self.student
        if self.compile:
            self.forward = compile_module(self.student)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=ids)

    def _live_teacher(self, teacher: nn.Module) -> LiveTeacher:
        """The teacher on the device with the speed settings, run on every step."""
        self.teacher = teacher.to(self.device)
        set_attention(self.teacher, self.attention)
        if self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        forward = compile_module(self.teacher) if self.compile else self.teacher
        return LiveTeacher(forward, self.clock, channels_last=self.channels_last)

    def _cached_teacher(self) -> TeacherSource:
        """``[teacher] cache`` for this process; the live teacher for the epochs it lacks."""
        p = self.parts

        def build_live() -> LiveTeacher:
            teacher = build_teacher(self.recipe, p.num_classes, p.mean, p.std)
            check_output(self.recipe, teacher, p.num_classes, "teacher")
            return self._live_teacher(teacher)

        where = dict(world_size=self.world_size, rank=self.rank, start_epoch=self.position.start_epoch)
        return cached_source(self.recipe, p, build_live, self.reporter.log, precision=self.precision, **where)

    def _setup_optimization(self) -> None:
        """Batch transform, label loss, optimizer, schedule and gradient scaler."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        p, o = self.parts, self.recipe.optimizer
        self.mixup = p.augmentation.batch_transform
        self.seed = self.recipe.run.seed
        smoothing = p.augmentation.smoothing
        self.base_criterion: nn.Module = (
            SoftTargetCrossEntropy()
            if self.mixup is not None
            else LabelSmoothingCrossEntropy(smoothing)
            if smoothing > 0
            else nn.CrossEntropyLoss()
        )
        self.uses_teacher = bool(self.teachers or self.cache) and getattr(p.strategy, "uses_teacher", True)
        self.lr = scaled_lr(self.recipe, self.world_size)
        self.optimizer = make_optimizer(self.recipe, self.student, self.lr)
        self.accumulate = o.accumulate
        self.updates_per_epoch = max(1, len(p.train_loader) // self.accumulate)
        self.scheduler = make_scheduler(self.recipe, self.optimizer, self.updates_per_epoch)
        # disabled (a pass-through) unless fp16: one update path for both
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    # ---------------------------------------------------------------- checkpoint state

    @property
    def position(self) -> Position:
        """Where the run stands (epoch, updates, best top-1, a mid-epoch resume)."""
        return self.train_state.position

    def state(
        self, epoch: int, metrics: dict[str, Any], *, resume_step: int = 0, partial: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (:meth:`TrainState.capture`; collective under DDP)."""
        return self.train_state.capture(epoch, metrics, resume_step=resume_step, partial=partial)

    # ---------------------------------------------------------------- the loop

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train to ``run.epochs``: evaluate and commit every epoch, stop on request."""
        from deitctl.data import BadImageError, BadShardError, clean_error_message

        try:
            return self._fit(resume)
        except BadImageError as exc:
            raise UserError(
                f'data: {clean_error_message(exc)}; set [data] bad_images = "skip" to skip unreadable images, '
                f"or run `deitctl data check {self.recipe.data.root}` to list every unreadable file before training"
            ) from exc
        except BadShardError as exc:
            raise UserError(f"data: {clean_error_message(exc)}") from exc
        finally:
            self.reporter.close()

    def _fit(self, resume: bool) -> TrainResult:
        self._begin(resume)
        r, pos = self.recipe, self.position
        last_metrics: dict[str, Any] = {}
        epoch = pos.start_epoch - 1
        with StopRequest() as stop:
            for epoch in range(pos.start_epoch, r.run.epochs):
                train_metrics = self.train_one_epoch(epoch, stop)
                if "stopped_at" in train_metrics:
                    self._commit_partial(epoch, train_metrics["stopped_at"], train_metrics["partial"])
                    self.reporter.log(
                        f"stopped at epoch {epoch + 1}, step {train_metrics['stopped_at']}; saved "
                        f"{self.run_dir / 'last.pt'} (continue with --resume)"
                    )
                    epoch -= 1
                    break
                last_metrics = self._end_epoch(epoch, train_metrics)
                if any_rank(stop.requested, self.device) and epoch + 1 < r.run.epochs:
                    self.reporter.log(f"stopped after epoch {epoch + 1}; continue with --resume")
                    break
        skipped = self.parts.train_loader.dataset.skipped.value  # type: ignore[attr-defined]
        if skipped:
            self.reporter.log(f"warning: {skipped} unreadable training images were skipped")
        if pos.skipped_steps:
            self.reporter.log(f"{pos.skipped_steps} fp16 steps were skipped by the gradient scaler (inf/NaN gradients)")
        if last_metrics and epoch + 1 == r.run.epochs:
            self.reporter.final({**last_metrics, "best_acc1": pos.best_acc1, "epochs": epoch + 1})
        return TrainResult(self.out, pos.best_acc1, last_metrics, epoch + 1)

    def _begin(self, resume: bool) -> None:
        """Resume when asked, prepare the run directory, and log what runs."""
        r = self.recipe
        if resume:
            self.train_state.restore(self.run_dir.last_checkpoint(), self.run_dir / "last.pt")
            pos = self.position
            if changed := self.train_state.changed_settings():
                self.reporter.log(
                    "warning: resuming keeps the checkpoint's optimizer and schedule state; changed settings "
                    f"not applied to them: {', '.join(changed)}"
                )
            where = f"epoch {pos.start_epoch + 1}" + (f", step {pos.resume_step + 1}" if pos.resume_step else "")
            self.reporter.log(f"resuming from {self.run_dir / 'last.pt'} at {where}")
        if self.cache and self.uses_teacher:  # checked before the run directory changes
            self.teachers = self._cached_teacher()
        self.run_dir.begin(r, resume_epoch=self.position.start_epoch if resume else None)
        for note in self.parts.notes:
            self.reporter.log(note)
        self.reporter.log(
            f"{r.run.name}: {self.parts.num_classes} classes, {len(self.parts.train_loader.dataset)} training images, "  # type: ignore[arg-type]
            f"device {self.device}, world size {self.world_size}, lr {self.lr:.3g}"
        )
        self.reporter.log(self.tuning.summary())
        self.reporter.log(
            f"optimizer {r.optimizer.name} ({optimizer_implementation(self.optimizer)}), "
            f"{torch.get_num_threads()} threads"
            + (", freed host memory kept for reuse" if self.retains_host_memory else "")
        )

    def _commit_partial(self, epoch: int, resume_step: int, partial: dict[str, float]) -> None:
        """``last.pt`` in the middle of ``epoch``, after ``resume_step`` of its steps (a stop
        request, or ``run.checkpoint_every``): ``--resume`` continues exactly from there."""
        state = self.state(epoch - 1, {}, resume_step=resume_step, partial=partial)
        if self.world.is_main:
            self.run_dir.commit_partial(state)

    def _end_epoch(self, epoch: int, train_metrics: dict[str, Any]) -> dict[str, Any]:
        """Evaluate when due, then commit the epoch (metrics line, best.pt, last.pt)."""
        r, pos = self.recipe, self.position
        is_last = epoch + 1 == r.run.epochs
        # the last evaluation also measures the teacher and the agreement (paper, Table 4)
        due = (epoch + 1) % r.run.eval_every == 0 or is_last
        eval_metrics = self.evaluate(with_teacher=is_last) if due else {}
        metrics: dict[str, Any] = {"epoch": epoch + 1, **train_metrics, **eval_metrics}
        if pos.skipped_steps:
            metrics["skipped_steps"] = pos.skipped_steps
        skipped = self.parts.train_loader.dataset.skipped.value  # type: ignore[attr-defined]
        if skipped:
            metrics["skipped_images"] = skipped
        if self.parts.dropped_images:
            metrics["dropped_images"] = self.parts.dropped_images
        improved = "acc1" in eval_metrics and eval_metrics["acc1"] > pos.best_acc1
        if improved:
            pos.best_acc1 = eval_metrics["acc1"]
        metrics["best_acc1"] = pos.best_acc1
        state = self.state(epoch, metrics)
        if self.world.is_main:
            self.run_dir.commit_epoch(metrics, state, improved=improved)
        self.reporter.epoch_end(metrics)
        return metrics

    def train_one_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        """One epoch (or its rest, after a mid-epoch resume); stops early, at an
        optimizer-update boundary, when a stop was requested (``"stopped_at"``)."""
        loader, pos = self.parts.train_loader, self.position
        skip, partial = pos.resume_step, pos.resume_partial
        pos.resume_step, pos.resume_partial = 0, {}
        loader.set_epoch(epoch, skip=skip * self.recipe.data.batch_size)
        self.student.train()
        steps = len(loader) + skip
        self.reporter.epoch_start(epoch, self.recipe.run.epochs, steps)
        total_loss = float(partial.get("loss_sum", 0.0))
        seen, elapsed0 = int(partial.get("seen", 0)), float(partial.get("elapsed", 0.0))
        started, stopped_at = time.perf_counter(), None
        self.optimizer.zero_grad(set_to_none=True)
        every = self.recipe.run.checkpoint_every
        for step, (images, targets) in enumerate(loader, start=skip):
            lr = self.optimizer.param_groups[0]["lr"]  # this step's (the update moves the schedule on)
            loss_value = self.train_step(images, targets, epoch=epoch, step=step)
            total_loss += loss_value * images.shape[0]
            seen += images.shape[0]
            self.reporter.step(images.shape[0] * self.world_size, loss_value, self.optimizer.param_groups[0]["lr"])
            update = (step + 1) % self.accumulate == 0
            if update and pos.num_updates % self.recipe.run.log_every == 0:
                scale = {"scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
                self.reporter.update(pos.num_updates, {"lr": lr, **scale})
            if not update or step + 1 == steps:
                continue  # not an update boundary, or the epoch's end (committed with the epoch)
            if any_rank(stop.requested, self.device):
                stopped_at = step + 1
                break
            if every and pos.num_updates % every == 0:
                done = {"loss_sum": total_loss, "seen": seen, "elapsed": elapsed0 + time.perf_counter() - started}
                self._commit_partial(epoch, step + 1, done)
        elapsed = elapsed0 + time.perf_counter() - started
        total_all, seen_all = all_reduce_sum([total_loss, float(seen)], self.device)
        out: dict[str, Any] = {
            "train_loss": total_all / max(seen_all, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": seen_all / max(elapsed, 1e-9),
            "train_images": int(seen_all),
            "epoch_time_s": elapsed,
        }
        if stopped_at is not None:
            out["stopped_at"] = stopped_at
            out["partial"] = {"loss_sum": total_loss, "seen": seen, "elapsed": elapsed}
        else:
            self.scheduler.step(scheduler_epoch_after(self.recipe, epoch))
        return out

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, step: int = 0) -> float:
        """One training step: batch augmentation, student and teacher forwards, the
        strategy's loss, backward, and (every ``accumulate`` steps) the update."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:  # seeded per (seed, epoch, step, rank): a cache can replay it
            images, targets = seeded_batch(self.mixup, images, targets, batch_seed(self.seed, epoch, step, self.rank))
        update = (step + 1) % self.accumulate == 0
        no_sync = not update and self.world.distributed
        with self.forward.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with self.autocast():
                outputs = self.forward(images)
                teacher_logits = self.teachers.logits(images, epoch, step) if self.uses_teacher else None  # type: ignore[union-attr]
                loss = self.parts.strategy(outputs, targets, teacher_logits, self.base_criterion)
            loss_value = loss.detach().float().item()
            if not math.isfinite(loss_value):
                raise RunError(
                    f"the loss is {loss_value} at epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is kept in {self.run_dir / 'last.pt'}"
                )
            self.scaler.scale(loss / self.accumulate).backward()
        if update:
            self._update()
        return loss_value

    def _update(self) -> None:
        """Clip, step (through the scaler, a pass-through unless fp16), schedule, EMA."""
        clip = self.recipe.optimizer.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            self.position.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.position.num_updates += 1
        self.scheduler.step_update(num_updates=self.position.num_updates)
        if self.ema is not None:
            self.ema.update(self.student, step=self.position.num_updates)

    # ---------------------------------------------------------------- evaluation

    def _eval_teacher(self) -> nn.Module | None:
        """The training teacher, or (strategy none) the recipe's teacher when its weights exist."""
        t = self.recipe.teacher
        if self.teacher is None and t is not None and t.checkpoint and Path(t.checkpoint).is_file():
            p = self.parts
            self.teacher = build_teacher(self.recipe, p.num_classes, p.mean, p.std).to(self.device)
        elif self.teacher is None and self.cache and t is not None:
            self.reporter.log(
                "no teacher agreement in the last evaluation: training read the teacher cache, and the "
                f"teacher's checkpoint {t.checkpoint!r} is not here"
            )
        return self.teacher

    def evaluate(self, *, with_teacher: bool = False) -> dict[str, Any]:
        loader = self.parts.val_loader
        self.reporter.eval_start(len(loader))
        common: dict[str, Any] = dict(
            num_classes=self.parts.num_classes,
            device=self.device,
            autocast=self.autocast,
            on_batch=self.reporter.eval_step,
        )
        teacher = self._eval_teacher() if with_teacher else None
        metrics = evaluate(self.student, loader, teacher=teacher, channels_last=self.channels_last, **common)
        if self.ema is not None:
            ema = evaluate(self.ema.module, loader, **common)
            metrics.update({"acc1_ema": ema["acc1"], "acc5_ema": ema["acc5"]})
        return metrics

    def close(self) -> None:
        """Stop the data loaders' persistent workers (they would outlive the run)."""
        from deitctl.data import release_workers

        release_workers(self.parts.train_loader)
        release_workers(self.parts.val_loader)
