"""Speed settings chosen by measurement: ``run.precision``, ``run.attention``, ``run.compile``,
``run.gelu_backward`` and ``run.channels_last`` set to ``"auto"``.

On a CPU, :func:`resolve_speed` times a few training steps (teacher forward, student forward
and backward) of copies of the recipe's own student and teacher, at the recipe's batch shape,
for each candidate, as cuDNN's benchmark mode does, and keeps the fastest:

1. eager: every precision × attention kernel the recipe leaves open, then the teacher's
   memory format on the fastest;
2. compiled (``torch.compile``): the fastest eager setting (and the next, when within
   :data:`SECOND` of it), with each GELU backward; the fastest eager setting and the
   compiled ones within :data:`MARGIN` of the fastest are then timed once more, their
   steps taken in turn over twice the steps, and these timings decide. A compiled setting is
   chosen only when the measured gain over the run's remaining steps pays back the compile
   time measured here; of those that do, the one that ends the run first.

A setting other than the recipe's baseline (fp32, fused attention, no compile) must be
:data:`MARGIN` faster to be chosen, so timing noise never trades fp32 for bf16. On CUDA a
rule decides (bf16 where the GPU has it; compile for runs of :data:`CUDA_COMPILE_STEPS`
steps or more). The figures are cached per (device model, torch version, threads, models,
batch shape) by :mod:`deitctl.speed_cache`, so the next run starts at once; under DDP rank 0
decides and broadcasts. The timed steps run on copies, under a forked RNG: the run's
models, optimizer and random streams are untouched.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deitctl.compiler import compile_module
from deitctl.machine import device_name, synchronize
from deitctl.runtime import autocast_factory, set_attention
from deitctl.speed_cache import cache_file, cache_key, cached_rows, store_rows

MARGIN = 0.03  # a non-baseline setting must be this much faster
AGAIN = 0.20  # after the first round, only candidates this close to the fastest are timed again
SECOND = 0.10  # the second-fastest eager setting is compiled too when this close to the fastest
CUDA_COMPILE_STEPS = 2000
WARMUP, STEPS, ROUNDS = 1, 3, 2
KEYS = ("precision", "attention", "compile", "gelu_backward", "channels_last")


@dataclass(frozen=True)
class Speed:
    """The speed settings a run uses."""

    precision: str = "fp32"
    attention: str = "fused"
    compile: bool = False
    gelu_backward: str = "recompute"
    channels_last: bool = False

    def label(self) -> str:
        parts = [self.precision, f"{self.attention} attention"]
        if self.channels_last:
            parts.append("channels_last teacher")
        parts.append(f"compiled, GELU backward {self.gelu_backward}" if self.compile else "eager")
        return ", ".join(parts)


@dataclass
class Tuning:
    """The outcome of :func:`resolve_speed`: the settings, and how they were decided."""

    speed: Speed
    how: str  # "fixed" (nothing auto), "rule" (CUDA), "measured", "cached"
    rows: list[dict[str, Any]]
    seconds: float = 0.0

    def summary(self) -> str:
        if self.how in ("fixed", "rule"):
            return f"speed ({self.how}): {self.speed.label()}"
        base = next((r for r in self.rows if _speed(r) == _baseline(self.rows)), None)
        chosen = next((r for r in self.rows if _speed(r) == self.speed), None)
        gain = ""
        if base and chosen and base is not chosen:
            gain = f", {base['step_s'] / chosen['step_s']:.2f}× the speed of {_speed(base).label()}"
        timing = f" in {self.seconds:.1f} s" if self.how == "measured" else ""
        return f"speed ({self.how}{timing}): {self.speed.label()}{gain}"


def format_row(row: dict[str, Any]) -> str:
    compile_s = f", compiling {row['compile_s']:.1f} s" if row.get("compile_s") else ""
    return f"{row_label(row)}: {row['step_s'] * 1000:.1f} ms/step{compile_s}"


def row_label(row: dict[str, Any]) -> str:
    """The settings a row of the table timed, as the log names them."""
    return _speed(row).label()


def _speed(row: dict[str, Any]) -> Speed:
    return Speed(**{k: row[k] for k in KEYS})


def _baseline(rows: list[dict[str, Any]]) -> Speed:
    return _speed(rows[0])


# ---------------------------------------------------------------- the candidates


def _choices(value: Any, auto: list[Any]) -> list[Any]:
    return auto if value == "auto" else [value]


def is_auto(run: Any) -> bool:
    return any(getattr(run, k) == "auto" for k in KEYS)


def candidates(
    run: Any, *, has_teacher_convs: bool, has_attention: bool = True, fixed_precision: str = ""
) -> dict[str, list[Any]]:
    """Per key, the values a recipe's ``[run]`` leaves open (the first is the baseline).
    GELU's stored derivative acts only in a compiled forward; the memory format only on a
    convolutional teacher; the attention kernel only on models with timm attention blocks."""
    compile = _choices(run.compile, [False, True])
    return {
        "precision": [fixed_precision] if fixed_precision else _choices(run.precision, ["fp32", "bf16"]),
        "attention": _choices(run.attention, ["fused", "math"] if has_attention else ["fused"]),
        "compile": compile,
        "gelu_backward": _choices(run.gelu_backward, ["recompute", "saved"] if True in compile else ["recompute"]),
        "channels_last": _choices(run.channels_last, [False, True]) if has_teacher_convs else [False],
    }


def cuda_rule(options: dict[str, list[Any]], total_steps: int) -> Speed:
    """On CUDA: bf16 where the GPU has it (else fp16), the fused attention kernel,
    PyTorch's GELU backward, channels_last for a CNN teacher, compile for long runs."""

    def pick(key: str, preferred: Any) -> Any:
        values = options[key]
        return preferred if preferred in values else values[0]

    low = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Speed(
        precision=pick("precision", low) if len(options["precision"]) > 1 else options["precision"][0],
        attention=pick("attention", "fused"),
        compile=pick("compile", total_steps >= CUDA_COMPILE_STEPS),
        gelu_backward=pick("gelu_backward", "recompute"),
        channels_last=pick("channels_last", True),
    )


# ---------------------------------------------------------------- timing


class StepTimer:
    """Times training steps of copies of a student and a teacher on one synthetic batch."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: tuple[int, ...],
        num_classes: int,
        device: torch.device,
    ) -> None:
        self.student, self.teacher, self.device = student, teacher, device
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, generator=g).to(device)
        self.targets = torch.randint(0, num_classes, (batch[0],), generator=g).to(device)

    def _models(self, s: Speed, *, reset: bool = True) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
        from deitctl.activations import save_gelu_derivative

        student = copy.deepcopy(self.student).to(self.device).train()
        set_attention(student, s.attention)
        if callable(distilled := getattr(student, "set_distilled_training", None)):
            distilled(True)  # both heads' outputs, as in training
        if s.compile and s.gelu_backward == "saved":
            save_gelu_derivative(student)
        teacher = None
        if self.teacher is not None:
            teacher = copy.deepcopy(self.teacher).to(self.device).eval()
            set_attention(teacher, s.attention)
            if s.channels_last:
                teacher = teacher.to(memory_format=torch.channels_last)
        if s.compile:
            if reset:
                torch._dynamo.reset()
            return compile_module(student), compile_module(teacher) if teacher is not None else None
        return student, teacher

    def _step(self, s: Speed, student: Callable[..., Any], teacher: Callable[..., Any] | None) -> float:
        autocast = autocast_factory(self.device, s.precision)
        images = self.images
        synchronize(self.device)
        t0 = time.perf_counter()
        with autocast():
            if teacher is not None:
                t_in = images.contiguous(memory_format=torch.channels_last) if s.channels_last else images
                with torch.inference_mode():
                    teacher(t_in)
            outputs = student(images)
            outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
            loss = sum(F.cross_entropy(o.float(), self.targets) for o in outputs)
        loss.backward()  # type: ignore[union-attr]
        synchronize(self.device)
        return time.perf_counter() - t0

    def _forked_rng(self) -> Any:
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _warm_up(self, s: Speed, models: tuple[Any, Any], warmup: int = WARMUP) -> float:
        """``warmup`` steps, one more for a compiled model (its first step compiles); returns
        the first step's seconds."""
        first = self._step(s, *models)
        for _ in range(max(0, warmup - 1) + (1 if s.compile else 0)):
            self._step(s, *models)
        return first

    def measure(self, s: Speed, *, warmup: int = WARMUP, steps: int = STEPS) -> tuple[float, float]:
        """Median seconds per step, and the first step's extra time (compiling)."""
        with self._forked_rng():
            models = self._models(s)
            first = self._warm_up(s, models, warmup)
            times = [self._step(s, *models) for _ in range(steps)]
        step = statistics.median(times)
        return step, max(0.0, first - step) if s.compile else 0.0

    def alternate(self, speeds: list[Speed], *, steps: int = 2 * STEPS) -> list[float]:
        """Seconds per step of each setting, their steps taken in turn (the order rotating
        every round), so that a slow spell of the machine falls on all alike: the first
        setting's median, and the others' as their median ratio to it, round by round."""
        with self._forked_rng():
            torch._dynamo.reset()
            models = [self._models(s, reset=False) for s in speeds]
            for s, m in zip(speeds, models, strict=True):
                self._warm_up(s, m)
            times: list[list[float]] = [[] for _ in speeds]
            for i in range(steps):
                for j in ((i + k) % len(speeds) for k in range(len(speeds))):
                    times[j].append(self._step(speeds[j], *models[j]))
        # each setting against the first, step by step: a slow spell that starts between two
        # rounds falls on both steps of a pair alike
        first = times[0]
        return [statistics.median(first) * statistics.median(t / f for t, f in zip(ts, first)) for ts in times]


def _faster(row: dict[str, Any], best: dict[str, Any]) -> bool:
    return row["step_s"] < best["step_s"] * (1 - MARGIN)


def measure_candidates(
    timer: StepTimer, options: dict[str, list[Any]], *, rounds: int = ROUNDS, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The table of candidates (eager grid, memory format, compiled), each timed."""
    rows: dict[Speed, dict[str, Any]] = {}

    def run(s: Speed) -> dict[str, Any]:
        step, compile_s = timer.measure(s)
        row = rows.setdefault(s, {**asdict(s), "step_s": step, "compile_s": compile_s})
        row["step_s"] = min(row["step_s"], step)
        if log:
            log(f"  {format_row(row)}")
        return row

    first = Speed(*(options[k][0] for k in KEYS))
    eager = [
        replace(first, precision=p, attention=a, compile=False)
        for p in options["precision"]
        for a in options["attention"]
        if not (a == "cpp" and p != "fp32")  # the kernel is fp32 only; otherwise it is math
    ]
    contenders = eager
    for _ in range(rounds):  # rounds interleave the candidates, so a slow spell hits them all
        for s in contenders:
            run(s)
        fastest = min(rows[s]["step_s"] for s in eager)
        contenders = [s for s in eager if rows[s]["step_s"] <= fastest * (1 + AGAIN)]
    best = _pick([rows[s] for s in eager])
    if len(options["channels_last"]) > 1:
        run(replace(_speed(best), channels_last=True))
        best = _pick([best, rows[replace(_speed(best), channels_last=True)]])
    if True in options["compile"]:
        ranked = sorted((rows[s] for s in eager), key=lambda r: r["step_s"])
        close = [r for r in ranked[:2] if r["step_s"] <= ranked[0]["step_s"] * (1 + SECOND)]
        for r in close:
            base = replace(_speed(r), channels_last=_speed(best).channels_last, compile=True)
            for gelu in options["gelu_backward"]:
                run(replace(base, gelu_backward=gelu))
        # a compiled step often gains only a few per cent on a CPU: the fastest eager setting
        # and the compiled ones within MARGIN of the fastest are timed again, their steps in
        # turn, and these timings decide (a slow spell of the machine during one earlier
        # timing, or the minimum over more timings of one, does not)
        compiled = sorted((r for r in rows.values() if r["compile"]), key=lambda r: r["step_s"])
        if compiled[0]["step_s"] <= best["step_s"] * (1 + AGAIN):
            again = [best] + [r for r in compiled if r["step_s"] <= compiled[0]["step_s"] * (1 + MARGIN)]
            for row, step in zip(again, timer.alternate([_speed(r) for r in again]), strict=True):
                row["step_s"] = step
                if log:
                    log(f"  {format_row(row)} (in turn)")
    return list(rows.values())


def _pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest row; the first (baseline) unless another is :data:`MARGIN` faster."""
    best = rows[0]
    for row in rows[1:]:
        if _faster(row, best):
            best = row
    return best


def decide(rows: list[dict[str, Any]], total_steps: int, *, must_compile: bool = False) -> Speed:
    """The fastest eager setting, or a compiled one whose gain over ``total_steps`` steps
    pays back its compile time; ``must_compile`` (the recipe says ``compile = true``): the
    fastest compiled one."""
    if must_compile:
        return _speed(_pick([r for r in rows if r["compile"]]))
    eager = _pick([r for r in rows if not r["compile"]])

    def run_s(r: dict[str, Any]) -> float:
        return float(r["step_s"] * total_steps + r["compile_s"])

    # the one that ends the run first; another precision only MARGIN faster than the best in
    # the eager choice's (the other keys change float rounding only)
    paying = [r for r in rows if r["compile"] and _faster(r, eager) and run_s(r) < eager["step_s"] * total_steps]
    paying.sort(key=run_s)
    same = [r for r in paying if r["precision"] == eager["precision"]]
    best = paying[0] if paying else eager
    if same and run_s(best) >= run_s(same[0]) * (1 - MARGIN):
        best = same[0]
    return _speed(best)


# ---------------------------------------------------------------- the entry point


def _check_kernel(
    run: Any, options: dict[str, list[Any]], log: Callable[[str], None] | None, source: str | None = None
) -> None:
    """deitctl's C++ attention kernel: a candidate of ``auto`` where it builds (said in the
    log where it does not); a recipe that names it where it cannot build is an error."""
    from deitctl.attention_kernel import unavailable
    from deitctl.errors import RecipeError

    reason = unavailable()
    if run.attention == "cpp" and reason:
        raise RecipeError(
            f"attention = 'cpp': deitctl's C++ attention kernel cannot be built here ({reason})",
            source=source,
            key="run.attention",
        )
    if run.attention == "auto":
        if reason:
            if log:
                log(f"  attention 'cpp' left out: the kernel cannot be built here ({reason})")
        else:
            options["attention"].append("cpp")


def resolve_speed(
    run: Any,
    device: torch.device,
    student: nn.Module,
    teacher: nn.Module | None,
    *,
    batch: tuple[int, ...],
    num_classes: int,
    total_steps: int,
    fixed_precision: str = "",
    retune: bool = False,
    log: Callable[[str], None] | None = None,
    source: str | None = None,
) -> Tuning:
    """The run's speed settings: the recipe's own where it fixes them; for ``"auto"``, a
    rule on CUDA and the fastest measured candidate on CPU (cached; ``retune``: measure
    again). ``fixed_precision``: a precision already decided (a teacher cache's); ``source``:
    the recipe's file, for messages."""
    convs = teacher is not None and any(isinstance(m, nn.Conv2d) for m in teacher.modules())
    models = [m for m in (student, teacher) if m is not None]
    attention = any(isinstance(getattr(m, "fused_attn", None), bool) for model in models for m in model.modules())
    options = candidates(run, has_teacher_convs=convs, has_attention=attention, fixed_precision=fixed_precision)
    if device.type == "cpu" and attention and run.attention in ("cpp", "auto") and "fp32" in options["precision"]:
        _check_kernel(run, options, log, source)
    if all(len(v) == 1 for v in options.values()):
        return Tuning(Speed(*(options[k][0] for k in KEYS)), "fixed", [])
    if device.type == "cuda":
        return Tuning(cuda_rule(options, total_steps), "rule", [])
    key = cache_key(device, student, teacher, batch, options)
    rows = None if retune else cached_rows(key)
    must_compile = options["compile"] == [True]
    if rows is not None:
        return Tuning(decide(rows, total_steps, must_compile=must_compile), "cached", rows)
    timer = StepTimer(student, teacher, batch, num_classes, device)
    if log:
        log(f"measuring the speed settings left to auto (once; kept in {cache_file()}):")
    started = time.perf_counter()
    rows = measure_candidates(timer, options, log=log)
    seconds = time.perf_counter() - started
    store_rows(key, rows, {"device": device_name(device), "torch": torch.__version__, "batch": list(batch)})
    return Tuning(decide(rows, total_steps, must_compile=must_compile), "measured", rows, seconds)


def broadcast(tuning: Tuning | None) -> Tuning:
    """Rank 0's settings on every rank (a world of one: as given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        assert tuning is not None
        return tuning
    box: list[Any] = [tuning]
    dist.broadcast_object_list(box, src=0)
    return box[0]
