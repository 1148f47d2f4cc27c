"""Alternated timing of training steps, for the scripts in this folder.

Each runner is a step function with its batches, either in this process or in a
process of its own (``multiprocessing`` spawn, so it starts with the C library's
and OpenMP's default state rather than ours). :func:`alternate` runs every
runner for a few steps in turn, round after round, in a rotated order, so that a
shared machine's changing load falls on all of them alike; only one runner
computes at a time. Besides step times, each runner counts the page faults
(minor) and the system CPU time of its process during its steps.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Step = Callable[[torch.Tensor, torch.Tensor, int], Any]
Made = tuple[Step, list[tuple[torch.Tensor, torch.Tensor]], torch.device]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def run_steps(step: Step, batches, first: int, count: int, device: torch.device) -> dict[str, Any]:
    """``count`` steps on ``batches`` (cycled from index ``first``): their times, and the
    process' minor page faults and system CPU seconds over them."""
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(first, first + count):
        x, y = batches[i % len(batches)]
        x, y = x.clone(), y.clone()  # timm's Mixup works in place
        _sync(device)
        t0 = time.perf_counter()
        step(x, y, i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"times": times, "faults": after.ru_minflt - before.ru_minflt, "system_s": after.ru_stime - before.ru_stime}


@dataclass
class Runner:
    name: str
    run: Callable[[int, int], dict[str, Any]]
    close: Callable[[], None] = lambda: None
    error: str = ""
    rounds: list[list[float]] = field(default_factory=list)
    faults: int = 0
    system_s: float = 0.0

    def record(self, out: dict[str, Any]) -> None:
        self.rounds.append(out["times"])
        self.faults += out["faults"]
        self.system_s += out["system_s"]

    @property
    def steps(self) -> int:
        return sum(len(r) for r in self.rounds)


def local_runner(name: str, step: Step, batches, device: torch.device) -> Runner:
    return Runner(name, lambda first, count: run_steps(step, batches, first, count, device))


def _serve(conn, make: Callable[..., Made], make_args: tuple) -> None:
    try:
        step, batches, device = make(*make_args)
    except Exception as exc:
        conn.send(("error", describe(exc)))
        return
    conn.send(("ok", None))
    while (request := conn.recv()) is not None:
        try:
            conn.send(("ok", run_steps(step, batches, *request, device)))
        except Exception as exc:  # e.g. torch.compile without a compiler
            conn.send(("error", describe(exc)))


def remote_runner(name: str, make: Callable[..., Made], *make_args: Any) -> Runner:
    """A runner in a fresh process: ``make(*make_args)`` (a module-level function) builds
    its step, batches and device there."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, make, make_args))  # not a daemon: it may start loader workers
    proc.start()

    def run(first: int, count: int) -> dict[str, Any]:
        parent.send((first, count))
        status, value = parent.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close() -> None:
        if proc.is_alive():
            with contextlib.suppress(OSError):
                parent.send(None)
            proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()

    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"the process building {name} exited ({proc.exitcode})"
    return Runner(name, run, close, error="" if status == "ok" else value)


def alternate(
    runners: list[Runner], *, rounds: int, steps: int, warmup: int, images: int, say: Callable[..., None] = print
) -> list[Runner]:
    """Warm every runner up (untimed), then ``rounds`` rounds of ``steps`` steps each,
    in an order rotated every round; returns the runners that did not fail. ``images``
    per step is for the progress lines."""
    for r in runners:
        started = time.perf_counter()
        if not r.error:
            try:
                r.run(0, warmup)
            except Exception as exc:
                r.error = describe(exc)
        say(
            f"  warm-up {r.name}: {time.perf_counter() - started:.1f} s{'  FAILED ' + r.error if r.error else ''}",
            flush=True,
        )
    live = [r for r in runners if not r.error]
    for rnd in range(rounds if live else 0):
        shift = rnd % len(live)
        for r in live[shift:] + live[:shift]:
            r.record(r.run(warmup + rnd * steps, steps))
        say(
            f"  round {rnd + 1}/{rounds}: "
            + ", ".join(f"{r.name} {images / statistics.median(r.rounds[-1]):.0f}" for r in live)
            + " img/s",
            flush=True,
        )
    return live


def speed_ratios(ref: Runner, r: Runner) -> list[float]:
    """Round by round: the reference's median step time over ``r``'s."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(ref.rounds, r.rounds)]


def median_step_s(r: Runner) -> float:
    return statistics.median([t for rd in r.rounds for t in rd])
