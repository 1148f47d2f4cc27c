#!/usr/bin/env python
"""Where a recipe's training step spends its time: ``torch.profiler`` over a few steps of
``deitctl.trainer.Trainer`` (the recipe's own step, on batches drawn from its loader and kept
in memory), the operators grouped by kind (dense matmuls, convolutions, attention, GELU,
normalisation, softmax, element-wise, optimizer), each kind's share of the CPU time and
the matmuls' own FLOP/s against this machine's dense-matmul peak.

``torch.profiler`` times each operator with hooks around it; on some CPUs (an Intel Xeon with
AMX) this inflates memory-bound kernels several times over (GELU 28 % of a step where
``perf record`` samples 3 %). Read the kinds and call counts here, and take shares of time
from a sampling profiler over plain steps: ``perf record -g deitctl benchmark RECIPE --steps 40``.

    python benchmarks/profile_step.py RECIPE [--set KEY=VALUE]... [--steps 5] [--shapes] [--json OUT]

``--shapes`` also lists the matmuls by their operands' shapes, with each one's time and FLOP/s
per step: the step's products to set against the same products timed alone (in the step they
read and write memory that is in no cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_addmm_activation")),
    ("convolution", ("aten::convolution", "aten::mkldnn_convolution", "aten::_convolution", "aten::conv2d")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("gelu", ("aten::gelu",)),
    ("normalisation", ("aten::native_layer_norm", "aten::layer_norm", "aten::batch_norm", "aten::native_batch_norm")),
    ("softmax", ("aten::_softmax", "aten::softmax", "aten::_log_softmax", "aten::log_softmax")),
    ("optimizer", ("aten::_fused_adamw", "aten::_foreach", "Optimizer.step")),
    ("copy and layout", ("aten::copy_", "aten::to", "aten::contiguous", "aten::clone", "aten::cat")),
)


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS:
        if name.startswith(prefixes):
            return kind
    return "other element-wise and glue"


def by_shape(prof: Any, steps: int) -> list[dict[str, Any]]:
    """The matmul operators grouped by their operands' shapes, slowest first, per step."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if kind_of(e.key) != "matmul" or not e.self_cpu_time_total:
            continue
        rows.append(
            {
                "op": e.key,
                "shapes": [list(s) for s in e.input_shapes if s],
                "calls_per_step": e.count / steps,
                "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "gflop_per_s": (e.flops or 0) / (e.self_cpu_time_total * 1e-6) / 1e9,
            }
        )
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", action="store_true", help="also the matmuls by operand shapes")
    p.add_argument("--json", dest="json_path", default="")
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from deitctl.benchmark import _prepare, draw_batches, train_step
    from deitctl.machine import describe, machine_info, matmul_peak, precisions_available
    from deitctl.recipe import load_recipe
    from deitctl.trainer import Trainer

    recipe = _prepare(load_recipe(args.recipe, args.sets), lambda m: print(m, file=sys.stderr))
    trainer = Trainer(recipe)
    batches, _ = draw_batches(trainer.parts.train_loader, args.warmup + args.steps, keep=args.warmup + args.steps)
    for i in range(args.warmup):
        train_step(trainer, batches[i][0].clone(), batches[i][1].clone(), i)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes, with_flops=True) as prof:
        for i in range(args.warmup, args.warmup + args.steps):
            train_step(trainer, batches[i][0].clone(), batches[i][1].clone(), i)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    matmul_flops = matmul_us = 0.0
    for e in events:
        kind = kind_of(e.key)
        by_kind[kind] += e.self_cpu_time_total
        if kind == "matmul" and e.flops:
            matmul_flops += e.flops
            matmul_us += e.self_cpu_time_total
    device = trainer.device
    machine = machine_info(device)
    peak = max(matmul_peak(device, precisions_available(device, recipe.run.precision)).values())
    # self CPU time adds up over threads' ops as the profiler records them: shares, not seconds
    shares = {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    result: dict[str, Any] = {
        "machine": machine,
        "speed": trainer.tuning.speed.label(),
        "shares": shares,
        "matmul_flops_per_s": matmul_flops / max(matmul_us * 1e-6, 1e-9),
        "matmul_peak_flops_per_s": peak,
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }
    print(f"{describe(machine)}; {result['speed']}")
    for kind, share in shares.items():
        print(f"  {kind:<30} {share:6.1%}")
    print(
        f"matmuls alone: {result['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s "
        f"({result['matmul_flops_per_s'] / peak:.0%} of the {peak / 1e9:.0f} GFLOP/s dense peak)"
    )
    print("top operators:")
    for row in result["top_ops"]:
        print(f"  {row['op']:<45} {row['share']:6.1%}  {row['calls']} calls")
    if args.shapes:
        result["matmuls_by_shape"] = by_shape(prof, args.steps)
        print("matmuls by operand shapes (per step):")
        for row in result["matmuls_by_shape"][:15]:
            print(
                f"  {row['op']:<12} {row['ms_per_step']:7.2f} ms  {row['calls_per_step']:5.1f} calls  "
                f"{row['gflop_per_s']:5.0f} GFLOP/s  {row['shapes']}"
            )
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
