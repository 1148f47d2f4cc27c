#!/usr/bin/env python
"""Start-up cost of light commands: wall time, ``python -X importtime`` totals,
and whether heavy modules (torch, timm, ...) were imported, and by whom.

    python benchmarks/cli_startup.py                  # deitctl --help, deitctl plugins
    python benchmarks/cli_startup.py --repeat 5 -- recipe show recipes/quickstart.toml
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "timm", "torchvision", "torchmetrics", "numpy", "PIL", "safetensors")

# Runs the CLI in-process; at exit, prints which heavy modules were imported and
# the module that first imported each (the innermost deitctl frame at that time).
PROBE = r"""
import atexit, builtins, sys, traceback
HEAVY = {heavy!r}
first = {{}}
real_import = builtins.__import__
def spy(name, *a, **k):
    top = name.split(".")[0]
    if top in HEAVY and top not in sys.modules and top not in first:
        frames = [f for f in traceback.extract_stack()[:-1] if "deitctl" in f.filename or "plugins" in f.filename]
        first[top] = f"{{frames[-1].filename}}:{{frames[-1].lineno}}" if frames else "?"
    return real_import(name, *a, **k)
builtins.__import__ = spy
atexit.register(lambda: sys.stderr.write(
    "HEAVY " + repr({{m: first.get(m, "?") for m in HEAVY if m in sys.modules}}) + "\n"))
sys.argv = ["deitctl"] + {args!r}
from deitctl.cli import main
main()
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def importtime(args: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """(total seconds of top-level imports, the five largest cumulative ones)."""
    proc = run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import sys; sys.argv=['deitctl']+sys.argv[1:]; from deitctl.cli import main; main()",
            *args,
        ]
    )
    top: list[tuple[float, str]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, raw_name = line[len("import time:") :].split("|")
        if raw_name.startswith("  "):  # nested import: counted in its parent
            continue
        top.append((int(cumulative.strip()) / 1e6, raw_name.strip()))
    return sum(t for t, _ in top), sorted(top, reverse=True)[:5]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("command", nargs="*", help="one deitctl command (default: --help, then plugins)")
    a = p.parse_args()
    commands = [a.command] if a.command else [["--help"], ["plugins"]]
    exe = shutil.which("deitctl")
    env = dict(os.environ)
    for args in commands:
        walls = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            proc = run([exe, *args] if exe else [sys.executable, "-m", "deitctl", *args], env=env)
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(f"deitctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-500:]}")
                return 1
        total, biggest = importtime(args)
        probe = run([sys.executable, "-c", PROBE.format(heavy=HEAVY, args=args)])
        heavy = next((line[6:] for line in probe.stderr.splitlines() if line.startswith("HEAVY ")), "?")
        print(f"deitctl {' '.join(args)}")
        print(
            f"  wall: median {statistics.median(walls):.2f} s "
            f"(min {min(walls):.2f}, max {max(walls):.2f}, {a.repeat} runs)"
        )
        print(
            f"  -X importtime, top-level imports: {total:.3f} s; largest: "
            + ", ".join(f"{name} {t * 1000:.0f} ms" for t, name in biggest)
        )
        print(f"  heavy modules imported (and where first): {heavy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
