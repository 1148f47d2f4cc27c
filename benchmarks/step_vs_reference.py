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
the body of ``Trainer.train_one_epoch``'s loop. Fixed speed combinations (every
speed key set explicitly) and ``auto``:

  deitctl            fp32, fused attention, eager (the defaults of an fp32 recipe)
  fp32_math          fp32, explicit-matmul attention
  bf16               bf16 autocast, explicit-matmul attention
  bf16_fused_attn    bf16, PyTorch's fused attention kernel
  channels_last      fp32, the teacher in channels_last
  compile            fp32, torch.compile (student and teacher), GELU derivative stored
  best_eager         bf16 + channels_last
  best               bf16 + channels_last + compile
  auto               every speed key "auto": deitctl measures the candidates on this
                     machine when the trainer is built (a fresh cache), then trains
  teacher_bf16       prototype: only the teacher under bf16 autocast (student fp32)
  loop_adamw         optimizer.implementation = "loop" (the reference's AdamW)
  compile_plain      compile as PyTorch alone does it: without deitctl's graph pass
                     (deitctl/compiler.py), to measure that pass against compile
  compile_sums       compile with the pass's column-sum rewrite alone, to measure its
                     bias-add and weight-gradient rewrites against compile

Shapes (``--shape``; the flags below change single dimensions):

  quickstart  recipes/quickstart.toml's models: DeiT-Ti⚗ (6 blocks, 128 wide), patch 8
              on 32 px (16 tokens), batch 64, a ResNet-18 teacher (32-256 channels)
  ti64        DeiT-Ti⚗ (12 blocks), patch 4 on 32 px (64 tokens), batch 64, the same teacher
  s224        DeiT-S⚗ at 224 px (196 tokens), batch 8, a ResNet-50 teacher

The reference: timm model, timm Mixup, a DistillationLoss that runs the
teacher inside the loss under no_grad, AdamW from timm's optimizer factory
(as the official main.py), eager fp32, ``loss.backward(); optimizer.step()``.
The summary gives deitctl fp32 / reference, the fastest fixed combination, and
auto / fastest fixed and auto / fp32 (goals: ≥ 1.0, ≥ 0.93 and ≥ 1.0).

    python benchmarks/step_vs_reference.py --shape ti64 --json ti64.json
    python benchmarks/step_vs_reference.py --shape s224 --variants deitctl,bf16,compile,best,auto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alternate import Runner, Step, alternate, local_runner, median_step_s, remote_runner, speed_ratios

FIXED = ("deitctl", "fp32_math", "bf16", "bf16_fused_attn", "channels_last", "compile", "best_eager", "best")
ALL_VARIANTS = (*FIXED, "auto", "teacher_bf16", "loop_adamw", "compile_plain", "compile_sums")
DEFAULT_VARIANTS = (*FIXED, "auto")
EAGER_BEST = ("bf16", "channels_last")
TWEAKS = {
    "deitctl": (),
    "fp32_math": ("math",),
    "bf16": ("bf16", "math"),
    "bf16_fused_attn": ("bf16",),
    "teacher_bf16": ("teacher_bf16",),
    "channels_last": ("channels_last",),
    "loop_adamw": ("loop_adamw",),
    "compile": ("compile",),
    "compile_plain": ("compile", "plain_compile"),
    "compile_sums": ("compile", "sums_compile"),
    "best_eager": (*EAGER_BEST, "math"),
    "best": (*EAGER_BEST, "math", "compile"),
    "auto": ("auto",),
}
SHAPES = {
    "quickstart": dict(
        student="deit_tiny_distilled_patch16_224", img_size=32, patch=8, depth=6, embed_dim=128, heads=2,
        batch=64, teacher="resnet18", teacher_channels=[32, 64, 128, 256],
    ),
    "ti64": dict(
        student="deit_tiny_distilled_patch16_224", img_size=32, patch=4, depth=12, embed_dim=192, heads=3,
        batch=64, teacher="resnet18", teacher_channels=[32, 64, 128, 256],
    ),
    "s224": dict(
        student="deit_small_distilled_patch16_224", img_size=224, patch=16, depth=12, embed_dim=384, heads=6,
        batch=8, teacher="resnet50", teacher_channels=[],
    ),
}  # fmt: skip


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
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        drop_path_rate=args.drop_path,
    )
    model.load_state_dict(student_state)
    model.set_distilled_training(True)
    model.to(device).train()
    channels = {"channels": args.teacher_channels} if args.teacher_channels else {}
    teacher = timm.create_model(args.teacher, num_classes=args.classes, **channels)
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
    channels = f"channels = [{', '.join(str(c) for c in args.teacher_channels)}]" if args.teacher_channels else ""
    return f"""
[run]
name = "step_vs_reference"
output_dir = {json.dumps(output_dir)}
epochs = 300
seed = 0
device = {json.dumps(args.device)}
precision = "fp32"
attention = "fused"
compile = false
gelu_backward = "recompute"
channels_last = false

[data]
dataset = "synthetic"
img_size = {args.img_size}
batch_size = {args.batch}
num_workers = 0
num_classes = {args.classes}
repeated_aug = 1
length = {args.batch * max(1, -(-args.run_steps // 300))}  # the run's length, for auto's compile pay-back

[student]
plugin = "deit"
model = {json.dumps(args.student)}
patch_size = {args.patch}
depth = {args.depth}
embed_dim = {args.embed_dim}
num_heads = {args.heads}
drop_path = {args.drop_path}

[teacher]
plugin = "timm"
model = {json.dumps(args.teacher)}
{channels}
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
        "bf16": ['run.precision="bf16"'],
        "math": ['run.attention="math"'],
        "channels_last": ["run.channels_last=true"],
        "loop_adamw": ['optimizer.implementation="loop"'],
        "compile": ["run.compile=true", 'run.gelu_backward="saved"'],
        "auto": [f'run.{k}="auto"' for k in args.auto_keys],
    }
    overrides = [item for t in tweaks for item in settings.get(t, [])]
    recipe = recipe_from_text(recipe_text(args, output_dir), "<step_vs_reference>", overrides)
    from deitctl import compiler

    every_pass = compiler.GRAPH_PASSES
    if "plain_compile" in tweaks:  # read when the Trainer compiles
        compiler.GRAPH_PASSES = ()
    elif "sums_compile" in tweaks:
        compiler.GRAPH_PASSES = ("column_sums",)
    try:
        trainer = Trainer(recipe)
    finally:
        compiler.GRAPH_PASSES = every_pass
    if "auto" in tweaks and (path := os.environ.get("STEP_VS_REFERENCE_AUTO")):
        tuning = trainer.tuning
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"chosen": tuning.speed.label(), "how": tuning.how, "seconds": tuning.seconds}, f)
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
    p.add_argument("--shape", default="ti64", choices=tuple(SHAPES), help="model and batch shape (see above)")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)} (the reference always runs)",
    )
    p.add_argument(
        "--auto-keys",
        type=lambda s: [k for k in s.split(",") if k],
        default=["precision", "attention", "compile", "gelu_backward", "channels_last"],
        help='the speed keys the auto variant sets to "auto" (the others stay as deitctl\'s fp32 defaults)',
    )
    p.add_argument(
        "--run-steps",
        type=int,
        default=100_000,
        help="steps of the recipe's run (300 epochs): auto compiles only when that pays back the compile time "
        "(100,000: CIFAR-10 at batch 128 for 300 epochs; ImageNet's are 375,000 at 1,024)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternation rounds")
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compilation happens here)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--student", default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--teacher-channels", type=lambda s: [int(c) for c in s.split(",") if c], default=None)
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
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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

    # auto measures in a fresh cache, so the choice is made here and now
    cache = tempfile.mkdtemp(prefix="step_vs_reference-cache-")
    os.environ["DEITCTL_CACHE_DIR"] = cache
    os.environ["STEP_VS_REFERENCE_AUTO"] = auto_file = os.path.join(cache, "auto.json")
    base = build_deitctl(args, (), out_dir)
    states = {
        "student": {k: v.detach().clone() for k, v in base.student.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in base.teacher.model.state_dict().items()},
    }
    names = ["reference"] + list(args.variants)
    from deitctl.machine import describe, machine_info

    machine = machine_info(device)
    print(
        f"{describe(machine)}; shape {args.shape}: "
        f"{args.student} depth {args.depth} width {args.embed_dim} at {args.img_size} px / patch {args.patch}, "
        f"batch {args.batch}; "
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
    auto = json.loads(Path(auto_file).read_text(encoding="utf-8")) if os.path.exists(auto_file) else {}
    report(args, runners, machine, auto)
    return 0


def summary(results: list[dict[str, Any]], auto: dict[str, Any]) -> dict[str, Any]:
    """deitctl fp32 / reference, the fastest fixed combination, auto against both."""
    ratio = {r["variant"]: r["ratio"] for r in results if "ratio" in r}
    out: dict[str, Any] = {}
    if "deitctl" in ratio:
        out["fp32_vs_reference"] = ratio["deitctl"]
    fixed = {k: v for k, v in ratio.items() if k in FIXED}
    if fixed:
        fastest = max(fixed, key=lambda k: fixed[k])
        out["fastest_fixed"], out["fastest_fixed_ratio"] = fastest, fixed[fastest]
    if "auto" in ratio:
        out["auto_ratio"], out["auto_chosen"] = ratio["auto"], auto.get("chosen", "?")
        out["auto_tuning_s"] = auto.get("seconds", 0.0)
        if fixed:
            out["auto_vs_fastest_fixed"] = ratio["auto"] / out["fastest_fixed_ratio"]
        if "deitctl" in ratio:
            out["auto_vs_fp32"] = ratio["auto"] / ratio["deitctl"]
    return out


def report(args: argparse.Namespace, runners: list[Runner], machine: dict[str, Any], auto: dict[str, Any]) -> None:
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
    totals = summary(results, auto)
    print()
    if "fp32_vs_reference" in totals:
        print(f"deitctl fp32 / reference: {totals['fp32_vs_reference']:.2f} (goal >= 1.0)")
    if "auto_ratio" in totals:
        print(f"auto chose: {totals['auto_chosen']} (measured in {totals['auto_tuning_s']:.1f} s)")
    if "auto_vs_fastest_fixed" in totals:
        print(f"auto / fastest fixed ({totals['fastest_fixed']}): {totals['auto_vs_fastest_fixed']:.2f} (goal >= 0.93)")
    if "auto_vs_fp32" in totals:
        print(f"auto / fp32 eager: {totals['auto_vs_fp32']:.2f} (goal >= 1.0)")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "machine": machine,
                    "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
                    "results": results,
                    "summary": totals,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
