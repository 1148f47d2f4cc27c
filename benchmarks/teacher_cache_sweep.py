"""The CIFAR-10 sweep (recipes/cifar10/) with and without the teacher-output cache, side by side.

Trains the teacher once, teaches the cache once (``deitctl teach``), then, for each round,
the ``none`` student and the soft, hard and token students, each with the live teacher and
from the cache, one after the other (live, cached, live, cached, ...), so that a change in
the machine's load hits both alike. Every run is a real ``deitctl train`` process; the
figures are its wall time and the sum of its epochs' ``epoch_time_s`` (the training loop,
without start-up and evaluation), each as a ratio to the ``none`` student of its round.

    python benchmarks/teacher_cache_sweep.py --epochs 3 --train-per-class 200 --rounds 2

Needs data/cifar10 (``tar xzf ../shared/data/cifar10-jpeg.tar.gz -C data/`` or ``deitctl
data cifar10``). Writes under ``--out`` (default runs/cache-sweep); prints a table, or JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "cifar10"
STUDENTS = ("soft", "hard", "token")


def deitctl(*argv: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deitctl", *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"deitctl {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started, proc.stderr


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def loop_seconds(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return sum(json.loads(line)["epoch_time_s"] for line in lines if line.strip())


def machine() -> dict[str, str]:
    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="the students' epochs")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="run.threads of every run (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/cache-sweep"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    size = [
        f"data.train_per_class={args.train_per_class}",
        f"data.val_per_class={args.val_per_class}",
        "run.progress=none",
        f"run.threads={args.threads}",
    ]
    teacher_ckpt = out / "teacher" / "best.pt"
    cache = out / "cache"
    load = [Path("/proc/loadavg").read_text().split()[:3]]
    timings: dict[str, float] = {}
    if not teacher_ckpt.exists():
        timings["teacher"], _ = deitctl(
            "train",
            str(RECIPES / "teacher.toml"),
            "--output-dir",
            str(out / "teacher"),
            *sets([*size, f"run.epochs={args.teacher_epochs}"]),
        )
    student = [*size, f"run.epochs={args.epochs}", f"teacher.checkpoint={json.dumps(str(teacher_ckpt))}"]
    timings["teach"], _ = deitctl("teach", str(RECIPES / "deit_hard.toml"), "--cache", str(cache), *sets(student))
    rows = []
    for r in range(args.rounds):
        row: dict[str, dict[str, float]] = {}
        runs = [("none", "none", [])]
        for name in STUDENTS:
            runs += [(f"{name} live", name, []), (f"{name} cached", name, [f"teacher.cache={json.dumps(str(cache))}"])]
        for label, recipe, extra in runs:
            run_dir = out / f"round{r}" / label.replace(" ", "-")
            wall, _ = deitctl(
                "train", str(RECIPES / f"deit_{recipe}.toml"), "--output-dir", str(run_dir), *sets(student + extra)
            )
            row[label] = {"wall_s": wall, "loop_s": loop_seconds(run_dir)}
        for figures in row.values():
            figures["wall_vs_none"] = figures["wall_s"] / row["none"]["wall_s"]
            figures["loop_vs_none"] = figures["loop_s"] / row["none"]["loop_s"]
        rows.append(row)
    load.append(Path("/proc/loadavg").read_text().split()[:3])
    report = {"machine": machine(), "loadavg_before_after": load, "settings": vars(args) | {"out": str(out)}}
    report |= {"once_s": timings, "rounds": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(json.dumps({k: report[k] for k in ("machine", "loadavg_before_after", "once_s")}))
    print(f"{'round':>5} {'run':>13} {'wall s':>8} {'loop s':>8} {'wall/none':>9} {'loop/none':>9}")
    for r, row in enumerate(rows):
        for label, f in row.items():
            print(
                f"{r:>5} {label:>13} {f['wall_s']:8.1f} {f['loop_s']:8.1f} {f['wall_vs_none']:9.3f} "
                f"{f['loop_vs_none']:9.3f}"
            )


if __name__ == "__main__":
    main()
