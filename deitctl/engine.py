"""The training engine: a recipe in, checkpoints and metrics out."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from deitctl import __version__
from deitctl.build import (
    build_augmentation,
    build_dataset,
    build_strategy,
    build_student,
    build_teacher,
    check_student_strategy,
    has_dist_token,
    init_student,
    normalization,
)
from deitctl.checkpoint import load_file, save_checkpoint
from deitctl.data import check_classes, make_loader, per_class_subset, release_workers
from deitctl.image_cache import cache_decoded
from deitctl.distributed import World, all_reduce_sum, any_rank
from deitctl.errors import RecipeError, RunError, UserError
from deitctl.evaluation import evaluate
from deitctl.recipe import Recipe, recipe_from_text
from deitctl.runtime import configure_process, resolve_attention, resolve_gelu_backward, resolve_precision, set_attention

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- devices, precision, RNG


def resolve_device(recipe: Recipe) -> torch.device:
    spec = recipe.run.device
    if spec == "cuda" and not torch.cuda.is_available():
        raise RecipeError("no CUDA device is available here (use \"auto\" or \"cpu\")", source=recipe.source, key="run.device")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(spec)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG, as tensors and plain data (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- assembly


@dataclass
class Parts:
    """Everything a run is made of."""

    recipe: Recipe
    device: torch.device
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    student: nn.Module
    strategy: Any
    augmentation: Any
    train_loader: Any
    val_loader: Any
    teacher: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _datasets(recipe: Recipe, aug: Any) -> tuple[Any, Any, list[str]]:
    train = build_dataset(recipe, recipe.data.train_split, aug.train_transform)
    val = build_dataset(recipe, recipe.data.val_split, aug.eval_transform)
    train_classes = list(getattr(train, "classes", []))
    val_classes = list(getattr(val, "classes", []))
    unknown = check_classes(train_classes, val_classes)
    if unknown:
        raise RecipeError(
            f"the {recipe.data.val_split!r} split has classes that {recipe.data.train_split!r} has not: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}",
            source=recipe.source,
            key="data.val_split",
        )
    if val_classes != train_classes and hasattr(val, "targets"):
        remap = [train_classes.index(c) for c in val_classes]
        val.target_transform = remap.__getitem__
        val.targets = [remap[t] for t in val.targets]
    train = per_class_subset(train, recipe.data.train_per_class)
    val = per_class_subset(val, recipe.data.val_per_class)
    return train, val, train_classes


def num_classes_of(recipe: Recipe) -> int:
    """The class count without building transforms (for imagefolder: its folders)."""
    if recipe.data.num_classes:
        return recipe.data.num_classes
    root = Path(recipe.data.root) / recipe.data.train_split
    if recipe.data.dataset == "imagefolder" and root.is_dir():
        return sum(1 for p in root.iterdir() if p.is_dir())
    return 0


def assemble(recipe: Recipe, *, world_size: int = 1, rank: int = 0, with_teacher: bool | None = None) -> Parts:
    """Build models, data and loss for a recipe."""
    device = resolve_device(recipe)
    strategy = build_strategy(recipe)
    num_classes = num_classes_of(recipe) or 1000
    student = build_student(recipe, num_classes)
    check_student_strategy(recipe, student, strategy)
    mean, std = normalization(student)
    aug = build_augmentation(recipe, mean, std, num_classes)
    train_ds, val_ds, classes = _datasets(recipe, aug)
    if classes and len(classes) != num_classes:
        if recipe.data.num_classes:
            raise RecipeError(
                f"is {recipe.data.num_classes} but the dataset has {len(classes)} classes",
                source=recipe.source,
                key="data.num_classes",
            )
        num_classes = len(classes)
        student = build_student(recipe, num_classes)
        aug = build_augmentation(recipe, mean, std, num_classes)
        train_ds, val_ds, classes = _datasets(recipe, aug)
    classes = classes or [str(i) for i in range(num_classes)]
    notes = init_student(student, recipe.student.checkpoint, recipe) if recipe.student.checkpoint else []
    check_output(recipe, student, num_classes, "student")
    if len(train_ds) < recipe.data.batch_size * world_size:
        raise RecipeError(
            f"the training split has {len(train_ds)} images, fewer than one batch "
            f"({recipe.data.batch_size} x {world_size} processes)",
            source=recipe.source,
            key="data.batch_size",
        )
    teacher = None
    if with_teacher if with_teacher is not None else recipe.uses_teacher:
        teacher = build_teacher(recipe, num_classes, mean, std)
        check_output(recipe, teacher, num_classes, "teacher")
    pin = recipe.data.pin_memory and device.type == "cuda"
    data_notes = [
        f"{split} split: {note}"
        for split, ds in ((recipe.data.train_split, train_ds), (recipe.data.val_split, val_ds))
        if (note := cache_decoded(ds, limit_mb=recipe.data.cache_mb, threads=_decode_threads(recipe)))
    ]
    loader_args = dict(num_workers=recipe.data.num_workers, pin_memory=pin, num_replicas=world_size, rank=rank,
                       seed=recipe.run.seed, bad_images=recipe.data.bad_images, worker_nice=recipe.data.worker_nice,
                       device=device)
    train_loader = make_loader(train_ds, batch_size=recipe.data.batch_size, train=True,
                               repeats=recipe.data.repeated_aug, **loader_args)
    val_loader = make_loader(val_ds, batch_size=recipe.data.batch_size, train=False, **loader_args)
    return Parts(recipe, device, classes, mean, std, student, strategy, aug, train_loader, val_loader, teacher,
                 extra={"notes": notes, "data_notes": data_notes})


def _decode_threads(recipe: Recipe) -> int:
    """Threads that fill the image cache: as many as the loader has workers, within the CPU count."""
    return max(1, min(recipe.data.num_workers, os.cpu_count() or 1))


def check_output(recipe: Recipe, module: nn.Module, num_classes: int, section: str) -> None:
    """A dummy batch through a student or teacher: logits of shape (2, num_classes)?"""
    size = recipe.data.img_size
    plugin = getattr(recipe, section).plugin
    was_training = module.training
    module.eval()
    with torch.no_grad():
        try:
            out = module(torch.zeros(2, 3, size, size))
        except Exception as exc:
            raise RecipeError(
                f"{section} plugin {plugin!r} failed on a [2, 3, {size}, {size}] batch: {type(exc).__name__}: {exc}",
                source=recipe.source,
                key=section,
            ) from None
        finally:
            module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(
            f"the {section} ({plugin!r}) returned {shape} for a batch of 2 images; expected logits of shape "
            f"[2, {num_classes}] ({num_classes} classes in the data)",
            source=recipe.source,
            key=section,
        )


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    output_dir: Path
    best_acc1: float
    last: dict[str, Any]
    epochs_run: int


class Reporter:
    """Receives progress events; the CLI renders them with rich."""

    def log(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, images: int, loss: float, lr: float) -> None: ...
    def epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def eval_start(self, batches: int) -> None: ...
    def eval_step(self, images: int) -> None: ...
    def close(self) -> None: ...


class StopRequest:
    """SIGINT/SIGTERM: stop at the next step after saving; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _scaled_lr(recipe: Recipe, world_size: int) -> float:
    o = recipe.optimizer
    if o.lr_scaling == "none":
        return o.lr
    return o.lr * recipe.data.batch_size * world_size * o.accumulate / o.lr_base_batch


def _make_optimizer(recipe: Recipe, model: nn.Module, lr: float):
    from timm.optim import create_optimizer_v2

    o = recipe.optimizer
    kwargs: dict[str, Any] = {}
    if o.name.lower() in ("sgd", "nesterov", "momentum", "rmsprop", "rmsproptf"):
        kwargs["momentum"] = o.momentum
    if any(n in o.name.lower() for n in ("adam", "lamb", "lars", "nadam", "radam")):
        kwargs.update(betas=tuple(o.betas), eps=o.eps)
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    tries = [impl["fused"], {}] if o.implementation == "auto" else [impl[o.implementation]]
    for extra in tries:
        try:
            return create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay, **kwargs, **extra)
        except TypeError as exc:  # this optimizer has no such implementation flag
            if extra is tries[-1] and o.implementation == "auto":
                raise RecipeError(f"timm cannot make optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.name") from None
            if extra is tries[-1]:
                raise RecipeError(f"optimizer {o.name!r} has no {o.implementation!r} implementation ({exc}); use \"auto\"",
                                  source=recipe.source, key="optimizer.implementation") from None
        except RuntimeError as exc:  # e.g. fused on a device that torch has no fused kernel for
            if o.implementation != "auto" or extra is tries[-1]:
                raise RecipeError(f"optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.implementation") from None
        except (ValueError, AssertionError, KeyError) as exc:
            raise RecipeError(f"timm cannot make optimizer {o.name!r}: {exc}", source=recipe.source, key="optimizer.name") from None
    raise AssertionError("unreachable")


def optimizer_implementation(optimizer: Any) -> str:
    """``fused``, ``foreach`` or ``loop``, as the optimizer was built (torch optimizers)."""
    defaults = getattr(optimizer, "defaults", {})
    if defaults.get("fused"):
        return "fused"
    return "loop" if defaults.get("foreach") is False else "foreach" if defaults.get("foreach") else "default"


def _make_scheduler(recipe: Recipe, optimizer: Any, updates_per_epoch: int):
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
        warmup_epochs=s.warmup_epochs,
        step_on_epochs=s.interval == "epoch",
        updates_per_epoch=updates_per_epoch,
    )[0]


def _strip_compile(state: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


class Trainer:
    """One training run."""

    def __init__(self, recipe: Recipe, reporter: Reporter | None = None, *, world: World | None = None):
        self.recipe, self.reporter = recipe, reporter or Reporter()
        self.world = world or World()
        rank, world_size = self.world.rank, self.world.world_size
        self.rank, self.world_size = rank, world_size
        self.out = recipe.output_dir
        seed_everything(recipe.run.seed + rank)
        self.parts = assemble(recipe, world_size=world_size, rank=rank)
        p = self.parts
        self.device = p.device
        self.retains_host_memory = configure_process(recipe.run.threads, recipe.run.retain_host_memory)
        self.precision = resolve_precision(self.device, recipe.run.precision)
        self.autocast = autocast_factory(self.device, self.precision)
        self.student = p.student.to(self.device)
        self.attention = resolve_attention(self.device, self.precision, recipe.run.attention)
        set_attention(self.student, self.attention)
        self.gelu_backward = resolve_gelu_backward(self.device, recipe.run.compile, recipe.run.gelu_backward)
        if self.gelu_backward == "saved":
            from deitctl.activations import save_gelu_derivative

            save_gelu_derivative(self.student)
        if has_dist_token(self.student):
            self.student.set_distilled_training(True)
        self.teacher = p.teacher.to(self.device) if p.teacher is not None else None
        if self.teacher is not None:
            set_attention(self.teacher, self.attention)
        if self.teacher is not None and recipe.run.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.mixup = p.augmentation.batch_transform
        self.base_criterion = self._base_criterion()
        self.lr = _scaled_lr(recipe, world_size)
        self.optimizer = _make_optimizer(recipe, self.student, self.lr)
        self.accumulate = recipe.optimizer.accumulate
        self.updates_per_epoch = max(1, len(p.train_loader) // self.accumulate)
        self.scheduler = _make_scheduler(recipe, self.optimizer, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.ema = None
        if recipe.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=recipe.ema.decay, use_warmup=recipe.ema.warmup)
        self.forward: nn.Module = self.student
        self.teacher_forward = self.teacher
        if recipe.run.compile:
            self.forward = torch.compile(self.student)
            if self.teacher is not None:
                self.teacher_forward = torch.compile(self.teacher)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.start_epoch, self.best_acc1, self.num_updates, self.skipped_steps = 0, -1.0, 0, 0
        self.resume_step, self.resume_partial = 0, {}

    def _base_criterion(self) -> nn.Module:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        smoothing = self.parts.augmentation.smoothing
        return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()

    # ---------------------------------------------------------------- state

    def state(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        p = self.parts
        return {
            "format": "deitctl-checkpoint-1",
            "deitctl_version": __version__,
            "model": _strip_compile(self.student.state_dict()),
            "model_ema": _strip_compile(self.ema.module.state_dict()) if self.ema is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": epoch,
            "num_updates": self.num_updates,
            "best_acc1": self.best_acc1,
            "metrics": metrics,
            "rng": rng_state(),
            "recipe": self.recipe.to_toml(),
            "classes": list(p.classes),
            "normalization": {"mean": list(p.mean), "std": list(p.std)},
            "img_size": self.recipe.data.img_size,
        }

    def resume(self, path: Path) -> None:
        ckpt = load_file(path)
        try:
            self.student.load_state_dict(ckpt["model"])
            if self.ema is not None and ckpt.get("model_ema"):
                self.ema.module.load_state_dict(ckpt["model_ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{path}: cannot resume this recipe from it ({type(exc).__name__}: {str(exc)[:300]})") from None
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_acc1 = float(ckpt.get("best_acc1", -1.0))
        self.num_updates = int(ckpt.get("num_updates", 0))
        self.resume_step = int(ckpt.get("resume_step", 0))
        self._warn_changed_settings(ckpt.get("recipe", ""))
        self.resume_partial = dict(ckpt.get("resume_partial", {}))
        set_rng_state(ckpt["rng"])

    def _warn_changed_settings(self, saved_text: str) -> None:
        """On resume, optimizer and schedule state come from the checkpoint."""
        from deitctl.recipe import parse_toml

        try:
            saved = parse_toml(saved_text, "checkpoint")
        except Exception:
            return
        now = self.recipe.to_dict()
        changed = [
            f"{section}.{key}"
            for section in ("optimizer", "schedule")
            for key, value in now.get(section, {}).items()
            if saved.get(section, {}).get(key, value) != value
        ]
        if saved.get("run", {}).get("epochs", self.recipe.run.epochs) != self.recipe.run.epochs:
            changed.append("run.epochs")
        if changed:
            self.reporter.log(
                f"warning: resuming keeps the checkpoint's optimizer and schedule state; changed settings "
                f"not applied to them: {', '.join(changed)}"
            )

    # ---------------------------------------------------------------- loop

    def train_one_epoch(self, epoch: int, stop: StopRequest) -> dict[str, Any]:
        """One epoch (or its rest, after a mid-epoch resume); stops early, at an
        optimizer-update boundary, when a stop was requested (``"stopped_at"``)."""
        loader = self.parts.train_loader
        skip, partial = self.resume_step, self.resume_partial
        self.resume_step, self.resume_partial = 0, {}
        loader.sampler.set_epoch(epoch, skip=skip * self.recipe.data.batch_size)
        self.student.train()
        steps = len(loader) + skip
        self.reporter.epoch_start(epoch, self.recipe.run.epochs, steps)
        total_loss = float(partial.get("loss_sum", 0.0))
        seen, elapsed0 = int(partial.get("seen", 0)), float(partial.get("elapsed", 0.0))
        started, stopped_at = time.perf_counter(), None
        self.optimizer.zero_grad(set_to_none=True)
        for step, (images, targets) in enumerate(loader, start=skip):
            loss_value = self.train_step(images, targets, epoch=epoch, step=step)
            update = (step + 1) % self.accumulate == 0
            total_loss += loss_value * images.shape[0]
            seen += images.shape[0]
            self.reporter.step(images.shape[0] * self.world_size, loss_value, self.optimizer.param_groups[0]["lr"])
            if update and step + 1 < steps and any_rank(stop.requested, self.device):
                stopped_at = step + 1
                break
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
            self.scheduler.step(epoch + 1)
        return out

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, step: int = 0) -> float:
        """One training step: batch augmentation, student and teacher forwards, the
        strategy's loss, backward, and (every ``accumulate`` steps) the update."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        update = (step + 1) % self.accumulate == 0
        sync = contextlib.nullcontext() if update or not self.world.distributed else self.forward.no_sync()
        with sync:
            with self.autocast():
                outputs = self.forward(images)
                teacher_logits = None
                if self.teacher_forward is not None and getattr(self.parts.strategy, "uses_teacher", True):
                    teacher_logits = self.teacher_logits(images)
                loss = self.parts.strategy(outputs, targets, teacher_logits, self.base_criterion)
            loss_value = loss.detach().float().item()
            if not math.isfinite(loss_value):
                raise RunError(
                    f"the loss is {loss_value} at epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is kept in {self.out / 'last.pt'}"
                )
            self._backward(loss / self.accumulate, update=update)
        return loss_value

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher on the student's (augmented, mixed) batch, in inference mode."""
        assert self.teacher_forward is not None
        if self.recipe.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self.teacher_forward(images)
        return logits.clone()  # a normal tensor again: the loss may save it for backward

    def _backward(self, loss: torch.Tensor, *, update: bool) -> None:
        clip = self.recipe.optimizer.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if not update:
                return
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.student.parameters(), clip)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.skipped_steps += 1
        else:
            loss.backward()
            if not update:
                return
            if clip:
                nn.utils.clip_grad_norm_(self.student.parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(self.student, step=self.num_updates)

    def _eval_teacher(self) -> nn.Module | None:
        """The training teacher, or (strategy none) the recipe's teacher when its weights exist."""
        t = self.recipe.teacher
        if self.teacher is None and t is not None and t.checkpoint and Path(t.checkpoint).is_file():
            p = self.parts
            self.teacher = build_teacher(self.recipe, p.num_classes, p.mean, p.std).to(self.device)
        return self.teacher

    def evaluate(self, *, with_teacher: bool = False) -> dict[str, Any]:
        loader = self.parts.val_loader
        self.reporter.eval_start(len(loader))
        common = dict(num_classes=self.parts.num_classes, device=self.device, autocast=self.autocast,
                      on_batch=self.reporter.eval_step)
        teacher = self._eval_teacher() if with_teacher else None
        metrics = evaluate(self.student, loader, teacher=teacher, channels_last=self.recipe.run.channels_last, **common)
        if self.ema is not None:
            ema = evaluate(self.ema.module, loader, **common)
            metrics.update({"acc1_ema": ema["acc1"], "acc5_ema": ema["acc5"]})
        return metrics

    def _save(self, state: dict[str, Any], name: str) -> None:
        """Save atomically; never over a good checkpoint with non-finite weights."""
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RunError(
                f"the weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                f"not saved, the last good checkpoint is kept in {self.out / name}"
            )
        existed = (self.out / name).exists()
        try:
            save_checkpoint(state, self.out / name)
        except OSError as exc:
            kept = f"the previous {name} is intact" if existed else f"no {name} was written"
            raise RunError(f"could not write {self.out / name}: {exc.strerror or exc}; {kept}") from None

    def fit(self, *, resume: bool = False) -> TrainResult:
        from deitctl.data import BadImageError, clean_error_message

        try:
            return self._fit(resume)
        except BadImageError as exc:
            raise UserError(
                f"data: {clean_error_message(exc)}; set [data] bad_images = \"skip\" to skip unreadable images"
            ) from None
        finally:
            self.reporter.close()

    def close(self) -> None:
        """Stop the data loaders' persistent workers (they would outlive the run)."""
        release_workers(self.parts.train_loader)
        release_workers(self.parts.val_loader)

    def _fit(self, resume: bool) -> TrainResult:
        r = self.recipe
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            last = self.out / "last.pt"
            if not last.exists():
                raise UserError(f"{last}: nothing to resume (no last.pt in the output directory)")
            self.resume(last)
            where = f"epoch {self.start_epoch + 1}" + (f", step {self.resume_step + 1}" if self.resume_step else "")
            self.reporter.log(f"resuming from {last} at {where}")
            _truncate_metrics(metrics_path, self.start_epoch)
        elif metrics_path.exists():
            metrics_path.unlink()
        if self.rank == 0:
            for stale in self.out.glob(".*.pt.*.tmp"):  # left by a killed run
                stale.unlink(missing_ok=True)
        if self.rank == 0:
            (self.out / "recipe.toml").write_text(r.to_toml(), encoding="utf-8")
        for note in self.parts.extra.get("notes", []):
            self.reporter.log(f"student initialised from {r.student.checkpoint}: {note}")
        for note in self.parts.extra.get("data_notes", []):
            self.reporter.log(note)
        self.reporter.log(
            f"{r.run.name}: {self.parts.num_classes} classes, {len(self.parts.train_loader.dataset)} training images, "
            f"device {self.device}, world size {self.world_size}, lr {self.lr:.3g}"
        )
        auto = " (auto)" if r.run.precision == "auto" else ""
        self.reporter.log(
            f"precision {self.precision}{auto}, attention {self.attention}, GELU backward {self.gelu_backward}, "
            f"optimizer {r.optimizer.name} "
            f"({optimizer_implementation(self.optimizer)}), {torch.get_num_threads()} threads"
            + (", freed host memory kept for reuse" if self.retains_host_memory else "")
        )
        last_metrics: dict[str, Any] = {}
        epoch = self.start_epoch - 1
        skipped = self.parts.train_loader.dataset.skipped
        with StopRequest() as stop:
            for epoch in range(self.start_epoch, r.run.epochs):
                train_metrics = self.train_one_epoch(epoch, stop)
                if "stopped_at" in train_metrics:
                    if self.rank == 0:
                        state = self.state(epoch - 1, {})
                        state.update(resume_step=train_metrics["stopped_at"], resume_partial=train_metrics["partial"])
                        self._save(state, "last.pt")
                    self.reporter.log(
                        f"stopped at epoch {epoch + 1}, step {train_metrics['stopped_at']}; saved {self.out / 'last.pt'} "
                        "(continue with --resume)"
                    )
                    epoch -= 1
                    break
                is_last = epoch + 1 == r.run.epochs
                # the last evaluation also measures the teacher and the agreement (paper, Table 4)
                eval_metrics = (self.evaluate(with_teacher=is_last)
                                if (epoch + 1) % r.run.eval_every == 0 or is_last else {})
                last_metrics = {"epoch": epoch + 1, **train_metrics, **eval_metrics}
                if self.skipped_steps:
                    last_metrics["skipped_steps"] = self.skipped_steps
                if skipped.value:
                    last_metrics["skipped_images"] = skipped.value
                improved = "acc1" in eval_metrics and eval_metrics["acc1"] > self.best_acc1
                if improved:
                    self.best_acc1 = eval_metrics["acc1"]
                last_metrics["best_acc1"] = self.best_acc1
                if self.rank == 0:
                    # last.pt is the commit point: what precedes it is redone on --resume
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(last_metrics) + "\n")
                    state = self.state(epoch, last_metrics)
                    if improved:
                        self._save(state, "best.pt")
                    self._save(state, "last.pt")
                self.reporter.epoch_end(last_metrics)
                if any_rank(stop.requested, self.device) and not is_last:
                    self.reporter.log(f"stopped after epoch {epoch + 1}; continue with --resume")
                    break
        if skipped.value:
            self.reporter.log(f"warning: {skipped.value} unreadable training images were skipped")
        if self.skipped_steps:
            self.reporter.log(f"{self.skipped_steps} fp16 steps were skipped by the gradient scaler (inf/NaN gradients)")
        return TrainResult(self.out, self.best_acc1, last_metrics, epoch + 1)


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """Keep each epoch once: drop lines of epochs that will run again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= start_epoch]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def prepare_output_dir(recipe: Recipe) -> Path:
    out = recipe.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"cannot write to output directory {str(out)!r}: {exc.strerror or exc}",
                          source=recipe.source, key="run.output_dir") from None
    return out


def recipe_of_checkpoint(ckpt: dict[str, Any], path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a checkpoint carries; a teacher whose plugin is not installed
    here is dropped with a warning (using the student does not need it)."""
    from deitctl.recipe import check_plugins

    text = ckpt.get("recipe")
    if not isinstance(text, str):
        raise UserError(f"{path}: not a deitctl checkpoint (no recipe inside); pass --model and --data")
    recipe = recipe_from_text(text, f"{path} (embedded recipe)", overrides, plugins=False)
    try:
        check_plugins(recipe)
    except RecipeError as exc:
        if recipe.teacher is None or not (exc.key or "").startswith("teacher"):
            raise
        recipe.warnings.append(f"teacher left out: {exc.detail}")
        recipe.teacher = None
        check_plugins(recipe)
    return recipe
