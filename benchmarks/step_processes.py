#!/usr/bin/env python
"""A recipe's training step under process-wide settings, each variant in a process of its own.

Settings such as ``run.retain_host_memory`` (the C library's allocator) or
``run.threads`` hold for a whole process, so variants that differ in them cannot
share one. Here each variant (a list of recipe overrides) builds its ``Trainer``
in a fresh process and draws a few batches from the recipe's real loader, kept
in memory as ``deitctl benchmark`` does; the processes then take turns, a few
steps each, round after round in a rotated order (only one computes at a time).
Each step is the engine's own (``Trainer.train_step``). Printed per variant:
images/s, speed relative to the first variant (per round, median and range),
and the page faults and system CPU time of its process per step.

    python benchmarks/step_processes.py recipes/quickstart.toml \\
        --variant "" --variant "run.retain_host_memory=false"

Nothing is written to the recipe's output directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from alternate import Runner, alternate, median_step_s, remote_runner, speed_ratios
from deitctl.recipe import load_recipe


def make(recipe_path: str, overrides: list[str]):
    """Built in the variant's process: its trainer's step, in-memory batches and device."""
    from deitctl.benchmark import _prepare, draw_batches, train_step
    from deitctl.data import release_workers
    from deitctl.recipe import load_recipe
    from deitctl.trainer import Trainer

    trainer = Trainer(_prepare(load_recipe(recipe_path, ["run.progress=none", *overrides]), print))
    batches, _ = draw_batches(trainer.parts.train_loader, 8, keep=8)
    release_workers(trainer.parts.train_loader)
    trainer.student.train()
    return (lambda x, y, i: train_step(trainer, x, y, i)), batches, trainer.device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="comma-separated KEY=VALUE overrides ('' for the recipe as is); repeatable; "
        "default: the recipe, and run.retain_host_memory=false",
    )
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    args = p.parse_args(argv)
    variants = args.variant if args.variant is not None else ["", "run.retain_host_memory=false"]
    runners: list[Runner] = []
    batch: dict[str, int] = {}
    try:
        for v in variants:
            overrides = [o.strip() for o in v.split(",") if o.strip()]
            runners.append(remote_runner(v or "the recipe", make, args.recipe, overrides))
            batch[runners[-1].name] = load_recipe(args.recipe, overrides, plugins=False).data.batch_size
        alternate(runners, rounds=args.rounds, steps=args.steps, warmup=args.warmup, images=batch[runners[0].name])
    finally:
        for r in runners:
            r.close()
    first = runners[0]
    width = max(len(r.name) for r in runners) + 2
    print(
        f"\n{'variant':<{width}} {'images/s':>9} {'x first':>8}   {'range':<10} {'faults/step':>12} {'sys ms/step':>12}"
    )
    for r in runners:
        if r.error or first.error:
            print(f"{r.name:<{width}} failed: {r.error or first.error}")
            continue
        ratios = speed_ratios(first, r)
        print(
            f"{r.name:<{width}} {batch[r.name] / median_step_s(r):>9.1f} {statistics.median(ratios):>8.2f}   "
            f"{min(ratios):.2f}-{max(ratios):.2f}  {r.faults / r.steps:>12.0f} {1e3 * r.system_s / r.steps:>12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
