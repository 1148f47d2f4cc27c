#!/usr/bin/env python
"""AdamW ``step()`` alone on the default DeiT-Ti student of step_vs_reference.py:
for-loop (torch's CPU default) vs foreach vs fused, at 1 and 2 intra-op threads,
alternated in rounds.

    python benchmarks/optimizer_step.py [--rounds 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from timm.optim import create_optimizer_v2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=6, num_classes=10)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    kinds = {"for-loop": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {
        k: create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, **kw) for k, kw in kinds.items()
    }
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(a.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, opt in optimizers.items():
                opt.step()  # warm
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    opt.step()
                times.setdefault((threads, name), []).append((time.perf_counter() - t0) / a.steps * 1000)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
        "ms per step(), median (range) over rounds"
    )
    for (threads, name), t in times.items():
        print(
            f"  {threads} thread{'s' if threads > 1 else ' '}  {name:<9} {statistics.median(t):7.1f}  "
            f"({min(t):.1f}-{max(t):.1f})"
        )


if __name__ == "__main__":
    main()
