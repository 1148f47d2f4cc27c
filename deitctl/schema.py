"""The recipe schema: sections and their keys, with the paper's defaults (README, "Recipes").

Sections that name a plugin (see :data:`deitctl.kinds.KINDS`) pass every key they do not
own to that plugin's factory; those keys land in the section's ``options``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, *, choices: tuple = (), min: float | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices, "min": min}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunSection:
    name: str = _f("deit", "run name, used for the default output directory")
    output_dir: str = _f("", "where checkpoints and metrics go (default runs/<name>)")
    epochs: int = _f(300, "training epochs", min=1)
    seed: int = _f(0, "random seed", min=0)
    device: str = _f("auto", "device", choices=("auto", "cpu", "cuda"))
    precision: str = _f(
        "fp32",
        "autocast precision (auto: on CPU the faster of fp32 and bf16, measured on this recipe's "
        "models; on CUDA bf16 where the GPU has it, else fp16)",
        choices=("fp32", "bf16", "fp16", "auto"),
    )
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)", min=1)
    checkpoint_every: int = _f(
        0,
        "also commit last.pt every N optimizer updates inside an epoch, so a killed run loses at most N "
        "updates (0: at epoch ends only)",
        min=0,
    )
    compile: bool | str = _f(
        False,
        "torch.compile the student and the teacher (auto: on CPU when the measured gain pays back "
        "the compile time over the run; on CUDA for runs of 2000 steps or more)",
        choices=(False, True, "auto"),
    )
    channels_last: bool | str = _f(
        False, "channels_last memory format for a CNN teacher (auto: measured on CPU)", choices=(False, True, "auto")
    )
    attention: str = _f(
        "auto",
        "attention kernel: fused (scaled_dot_product_attention), math (explicit matmuls) or cpp "
        "(deitctl's C++ kernel for short sequences, fp32 on CPU, built at first use); "
        "auto: the fastest, measured on CPU; fused on CUDA",
        choices=("auto", "fused", "math", "cpp"),
    )
    gelu_backward: str = _f(
        "auto",
        "GELU's backward: saved (the compiled forward also stores GELU's derivative, so "
        "the backward is one multiply; needs compile) or recompute (PyTorch's: erf and exp again "
        "from the saved input); auto: the faster, measured on CPU when compiling; recompute on CUDA",
        choices=("auto", "saved", "recompute"),
    )
    threads: int = _f(0, "torch intra-op threads per process (0: torch's default)", min=0)
    retain_host_memory: bool = _f(
        True,
        "keep freed host memory in the process for reuse (glibc malloc), so a CPU "
        "step does not page-fault its buffers in again every step; false: the C "
        "library's defaults",
    )
    progress: str = _f("auto", "progress output", choices=("auto", "rich", "plain", "none"))
    loggers: list[str] = _f([], "logger plugins that receive the run's figures (tensorboard, mlflow, wandb, ...)")
    log_every: int = _f(50, "send the training loss, lr, images/s and fp16 scale to the loggers every N updates", min=1)


@dataclass
class DataSection:
    dataset: str = _f("imagefolder", "dataset plugin")
    root: str = _f("data", "dataset root (for imagefolder: holds train/ and val/)")
    train_split: str = _f("train", "training split")
    val_split: str = _f("val", "validation split")
    img_size: int = _f(224, "student input resolution", min=1)
    batch_size: int = _f(128, "batch size per process", min=1)
    num_workers: int = _f(8, "data-loader worker processes", min=0)
    num_classes: int = _f(0, "class count (0: from the dataset)", min=0)
    repeated_aug: int = _f(3, "repeated augmentation: each image N times per epoch (1: off)", min=1)
    train_per_class: int = _f(0, "use at most N training images of each class (0: all)", min=0)
    val_per_class: int = _f(0, "use at most N validation images of each class (0: all)", min=0)
    pin_memory: bool = _f(True, "pin host memory (CUDA)")
    bad_images: str = _f("error", "on unreadable images: stop, or skip them", choices=("error", "skip"))
    worker_nice: int = _f(
        0,
        "raise the loader workers' niceness by N (Unix): on a CPU shared with the "
        "training step, the step's threads run first",
        min=0,
    )
    cache_mb: int = _f(
        2048, "decode each split's images once into RAM when their pixels take at most N MiB (0: never)", min=0
    )
    options: dict = field(default_factory=dict)


@dataclass
class StudentSection:
    plugin: str = _f("deit", "student plugin")
    checkpoint: str = _f("", "initialise the student from this file, timm:MODEL.TAG or an http(s)/file URL")
    options: dict = field(default_factory=dict)


@dataclass
class TeacherSection:
    plugin: str = _f("timm", "teacher plugin")
    checkpoint: str = _f("", "teacher weights: a file (.pth/.pt/.safetensors), timm:MODEL.TAG or an http(s)/file URL")
    recipe: str = _f("", "recipe that trains this teacher when the checkpoint does not exist yet")
    download: str = _f(
        "",
        "weights to fetch when checkpoint is empty or its file does not exist: timm:MODEL.TAG "
        "(timm's pretrained weights) or an http(s)/file URL; downloaded once, with progress, and cached",
    )
    mean: list[float] = _f([], "the teacher's input mean (default: the student's)")
    std: list[float] = _f([], "the teacher's input std (default: the student's)")
    input_size: int = _f(0, "the teacher's resolution (0: the student's)", min=0)
    cache: str = _f(
        "",
        "read the teacher's outputs from this `deitctl teach` folder instead of running the teacher "
        "(an epoch it lacks runs the live teacher when checkpoint exists)",
    )
    options: dict = field(default_factory=dict)


@dataclass
class AugmentationSection:
    plugin: str = _f("deit", "augmentation plugin")
    options: dict = field(default_factory=dict)


@dataclass
class DistillationSection:
    strategy: str = _f("none", "distillation strategy plugin")
    options: dict = field(default_factory=dict)


@dataclass
class OptimizerSection:
    name: str = _f("adamw", "timm optimizer name (adamw, lamb, sgd, ...)")
    lr: float = _f(5e-4, "learning rate for a global batch of lr_base_batch", min=0)
    lr_base_batch: int = _f(512, "batch size that lr is given for (linear scaling rule)", min=1)
    lr_scaling: str = _f("linear", "scale lr by global batch / lr_base_batch", choices=("linear", "none"))
    weight_decay: float = _f(0.05, "weight decay", min=0)
    momentum: float = _f(0.9, "momentum (sgd)", min=0)
    eps: float = _f(1e-8, "epsilon (adam family)", min=0)
    betas: list[float] = _f([0.9, 0.999], "betas (adam family)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this (0: off)", min=0)
    accumulate: int = _f(1, "gradient accumulation steps", min=1)
    implementation: str = _f(
        "auto",
        "fused, foreach or loop (torch optimizers); auto: fused where the optimizer has it",
        choices=("auto", "fused", "foreach", "loop"),
    )


@dataclass
class ScheduleSection:
    name: str = _f("cosine", "timm scheduler", choices=("cosine", "step", "multistep", "tanh", "poly", "const"))
    warmup_epochs: float = _f(5.0, "linear warm-up epochs", min=0)
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up", min=0)
    min_lr: float = _f(1e-5, "final learning rate", min=0)
    decay_epochs: float = _f(30.0, "step: epochs between decays", min=0)
    decay_rate: float = _f(0.1, "step: decay factor", min=0)
    decay_milestones: list[int] = _f([90, 180, 270], "multistep: epochs of the decays")
    cooldown_epochs: int = _f(0, "epochs at min_lr after the schedule", min=0)
    interval: str = _f(
        "update",
        "update the lr every optimizer update, or every epoch (epoch e at sched(e)); "
        "official: every epoch as the official main.py (epoch e at sched(e-1), the first two "
        "at warmup_lr)",
        choices=("update", "epoch", "official"),
    )


@dataclass
class EmaSection:
    enabled: bool = _f(True, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    decay: float = _f(0.99996, "EMA decay (the official DeiT value)", min=0)
    warmup: bool = _f(False, "EMA decay warm-up (useful for short runs)")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "student": StudentSection,
    "teacher": TeacherSection,
    "augmentation": AugmentationSection,
    "distillation": DistillationSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "ema": EmaSection,
}
