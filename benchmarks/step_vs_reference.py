#!/usr/bin/env python
"""deitctl's training step against a plain reference loop written the way the
official DeiT engine (facebookresearch/deit, engine.py + losses.py) does it.

Both sides train the same model (same initial weights) on the same in-memory
batches, alternated: every round runs each variant for ``--steps`` steps, in a
rotated order (ABCD, BCDA, ...), so that load from other processes on a shared
machine hits every variant alike. Each variant is reported as images/s and as
the ratio of its speed to the reference's, taken round by round (median step
time of the variant vs the reference's in that round) and summarised by the
median over rounds (and the range), with its page faults and system CPU time
per step. By default each runner has a process of its own (``--isolation
process``; only one computes at a time), so the reference runs with the C
library's defaults, as the official code does, while deitctl's variants apply
their recipe's process-wide settings (``run.retain_host_memory``);
``--isolation none`` runs everything in this process.

deitctl's side is ``deitctl.trainer.Trainer`` built from a recipe (synthetic
data, so no files), stepped by :func:`deitctl.benchmark.train_step`, which is
the body of ``Trainer.train_one_epoch``'s loop (the trainer's own Mixup,
forwards, strategy and ``_backward``). Variants:

  deitctl            the engine as it is, fp32 (its defaults: teacher in inference mode,
                     fused AdamW, fused attention kernel in fp32)
  bf16               recipe run.precision = "bf16" (autocast; attention "auto" picks the
                     explicit-matmul kernel for bf16 on CPU)
  bf16_fused_attn    bf16 with run.attention = "fused" (PyTorch's flash kernel; slow
                     backward in bf16 on CPU)
  teacher_bf16       prototype: only the teacher under bf16 autocast (student fp32)
  channels_last      recipe run.channels_last = true (the teacher)
  loop_adamw         recipe optimizer.implementation = "loop" (the reference's AdamW)
  compile            recipe run.compile = true (torch.compile student and teacher)
  best_eager         bf16 + channels_last
  best               best_eager + compile

The reference: timm model, timm Mixup, a DistillationLoss that runs the
teacher inside the loss under no_grad, AdamW from timm's optimizer factory
(as the official main.py), eager fp32, ``loss.backward(); optimizer.step()``.

    python benchmarks/step_vs_reference.py                 # the defaults below
    python benchmarks/step_vs_reference.py --threads 1 --variants deitctl,bf16,best_eager
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alternate import Runner, Step, alternate, local_runner, median_step_s, remote_runner, speed_ratios

ALL_VARIANTS = (
    "deitctl",
    "bf16",
    "bf16_fused_attn",
    "teacher_bf16",
    "channels_last",
    "loop_adamw",
    "compile",
    "best_eager",
    "best",
)
EAGER_BEST = ("bf16", "channels_last")
TWEAKS = {
    "deitctl": (),
    "bf16": ("bf16",),
    "bf16_fused_attn": ("bf16", "fused_attn"),
    "teacher_bf16": ("teacher_bf16",),
    "channels_last": ("channels_last",),
    "loop_adamw": ("loop_adamw",),
    "compile": ("compile",),
    "best_eager": EAGER_BEST,
    "best": EAGER_BEST + ("compile",),
}


# --------------------------------------------------------------------------- the reference (official DeiT style)


class DistillationLoss(nn.Module):
    """As the official deit/losses.py: the teacher runs inside the loss."""

    def __init__(
        self, base_criterion: nn.Module, teacher_model: nn.Module, distillation_type: str, alpha: float, tau: float
    ):
        super().__init__()
        self.base_criterion, self.teacher_model = base_criterion, teacher_model
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = (
                F.kl_div(
                    F.log_softmax(outputs_kd / T, dim=1),
                    F.log_softmax(teacher_outputs / T, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (T * T)
                / outputs_kd.numel()
            )
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


@dataclass
class Reference:
    model: nn.Module
    criterion: nn.Module
    mixup_fn: Any
    optimizer: Any
    device: torch.device

    def step(self, samples: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        samples = samples.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        samples, targets = self.mixup_fn(samples, targets)
        outputs = self.model(samples)
        loss = self.criterion(samples, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            sys.exit(f"reference: loss is {loss_value}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def build_reference(
    args: argparse.Namespace, student_state: dict, teacher_state: dict, lr: float, device: torch.device
) -> Reference:
    import timm
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    model = timm.create_model(
        args.student,
        num_classes=args.classes,
        img_size=args.img_size,
        patch_size=args.patch,
        depth=args.depth,
        drop_path_rate=args.drop_path,
    )
    model.load_state_dict(student_state)
    model.set_distilled_training(True)
    model.to(device).train()
    teacher = timm.create_model(args.teacher, num_classes=args.classes, channels=args.teacher_channels)
    teacher.load_state_dict(teacher_state)
    teacher.to(device).eval()
    mixup_fn = Mixup(
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.1,
        num_classes=args.classes,
    )
    criterion = DistillationLoss(SoftTargetCrossEntropy(), teacher, "hard", 0.5, 1.0)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.05)
    return Reference(model, criterion, mixup_fn, optimizer, device)


# --------------------------------------------------------------------------- deitctl


def recipe_text(args: argparse.Namespace, output_dir: str) -> str:
    channels = ", ".join(str(c) for c in args.teacher_channels)
    return f"""
[run]
name = "step_vs_reference"
output_dir = {json.dumps(output_dir)}
epochs = 300
seed = 0
device = {json.dumps(args.device)}
precision = "fp32"

[data]
dataset = "synthetic"
img_size = {args.img_size}
batch_size = {args.batch}
num_workers = 0
num_classes = {args.classes}
repeated_aug = 1
length = {args.batch}

[student]
plugin = "deit"
model = {json.dumps(args.student)}
patch_size = {args.patch}
depth = {args.depth}
drop_path = {args.drop_path}

[teacher]
plugin = "timm"
model = {json.dumps(args.teacher)}
channels = [{channels}]
checkpoint = ""

[augmentation]
plugin = "deit"

[distillation]
strategy = "token"
target = "hard"
alpha = 0.5

[optimizer]
name = "adamw"
lr = 5e-4
weight_decay = 0.05

[ema]
enabled = false
"""


def build_deitctl(args: argparse.Namespace, tweaks: tuple[str, ...], output_dir: str):
    from deitctl.recipe import recipe_from_text
    from deitctl.trainer import Trainer

    settings = {
        "bf16": 'run.precision="bf16"',
        "fused_attn": 'run.attention="fused"',
        "channels_last": "run.channels_last=true",
        "loop_adamw": 'optimizer.implementation="loop"',
        "compile": "run.compile=true",
    }
    overrides = [settings[t] for t in tweaks if t in settings]
    recipe = recipe_from_text(recipe_text(args, output_dir), "<step_vs_reference>", overrides)
    trainer = Trainer(recipe)
    if "teacher_bf16" in tweaks:  # prototype: the teacher alone in bf16, fp32 logits out
        live = trainer.teachers  # a LiveTeacher: the teacher's forward on every step
        teacher_fp32 = live.forward

        def teacher_bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(trainer.device.type, dtype=torch.bfloat16):
                return teacher_fp32(x).float()

        live.forward = teacher_bf16
    return trainer


# --------------------------------------------------------------------------- runners


def make_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g),
            torch.randint(0, args.classes, (args.batch,), generator=g),
        )
        for _ in range(4)
    ]


def make_step(args: argparse.Namespace, name: str, states: dict, lr: float, base=None) -> Step:
    """One runner's step function: the reference, or deitctl with ``name``'s settings."""
    device = torch.device(args.device)
    if name == "reference":
        return build_reference(args, states["student"], states["teacher"], lr, device).step
    from deitctl.benchmark import train_step

    out_dir = f"{tempfile.gettempdir()}/step_vs_reference-unused"  # Trainer never writes (no fit)
    trainer = base if name == "deitctl" and base is not None else build_deitctl(args, TWEAKS[name], out_dir)
    trainer.student.load_state_dict(states["student"])
    trainer.student.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    return lambda x, y, i: train_step(trainer, x, y, i)


def make_in_process(args: argparse.Namespace, name: str, states_path: str, lr: float):
    """What a runner's own process builds (``--isolation process``)."""
    import random

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy

        numpy.random.seed(0)  # timm's Mixup draws from numpy
    except ImportError:
        pass
    step = make_step(args, name, torch.load(states_path), lr)
    return step, make_batches(args), torch.device(args.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS),
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)} (the reference always runs)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternation rounds")
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compilation happens here)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--student", default="deit_tiny_distilled_patch16_224")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--teacher-channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 128, 256])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--isolation",
        default="process",
        choices=("process", "none"),
        help="process: each runner in a process of its own, stepped in turn (the default: the "
        "reference keeps the C library's allocator settings, as the official code runs); "
        "none: all in this process",
    )
    p.add_argument("--json", dest="json_path", default="", help="also write the results to this file")
    p.add_argument(
        "--write-recipe",
        default="",
        metavar="PATH",
        help="write deitctl's recipe for these settings (fp32) to PATH and exit",
    )
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in TWEAKS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_recipe:
        with open(args.write_recipe, "w", encoding="utf-8") as f:
            f.write(recipe_text(args, f"{tempfile.gettempdir()}/step_vs_reference-unused"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = f"{tempfile.gettempdir()}/step_vs_reference-unused"  # Trainer never writes (no fit)

    base = build_deitctl(args, (), out_dir)
    states = {
        "student": {k: v.detach().clone() for k, v in base.student.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in base.teacher.model.state_dict().items()},
    }
    names = ["reference"] + list(args.variants)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
        f"{args.student} depth {args.depth} at {args.img_size} px / patch {args.patch}, batch {args.batch}; "
        f"teacher {args.teacher} {args.teacher_channels}; {args.rounds} rounds x {args.steps} steps; "
        f"isolation {args.isolation}",
        flush=True,
    )
    runners: list[Runner] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.isolation == "process":
                states_path = f"{tmp}/states.pt"
                torch.save(states, states_path)
                for name in names:
                    runners.append(remote_runner(name, make_in_process, args, name, states_path, base.lr))
            else:
                batches = make_batches(args)
                for name in names:
                    runners.append(local_runner(name, make_step(args, name, states, base.lr, base), batches, device))
            alternate(runners, rounds=args.rounds, steps=args.steps, warmup=args.warmup, images=args.batch)
        finally:
            for r in runners:
                r.close()
    report(args, runners)
    return 0


def report(args: argparse.Namespace, runners: list[Runner]) -> None:
    ref = runners[0]
    results = []
    for r in runners:
        if r.error or ref.error:
            results.append({"variant": r.name, "error": r.error or f"reference: {ref.error}"})
            continue
        ratios = speed_ratios(ref, r)
        results.append(
            {
                "variant": r.name,
                "images_per_s": args.batch / median_step_s(r),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "page_faults_per_step": r.faults / r.steps,
                "system_ms_per_step": 1e3 * r.system_s / r.steps,
            }
        )
    print()
    print(
        f"{'variant':<16} {'images/s':>10} {'x reference':>12}   {'range over rounds':<18} "
        f"{'faults/step':>12} {'sys ms/step':>12}"
    )
    for row in results:
        if "error" in row:
            print(f"{row['variant']:<16} {'failed':>10}   {row['error']}")
        else:
            print(
                f"{row['variant']:<16} {row['images_per_s']:>10.1f} {row['ratio']:>12.2f}   "
                f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}{'':<9} "
                f"{row['page_faults_per_step']:>12.0f} {row['system_ms_per_step']:>12.1f}"
            )
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
