"""``deitctl benchmark``: how fast a recipe trains, evaluates and loads data.

The recipe's parts are built by :class:`deitctl.trainer.Trainer` (the same
models, optimizer, scheduler, Mixup/CutMix, strategy and loaders as a run),
and nothing is written to the output directory (``fit`` is never called).

Measured, each after ``warmup`` untimed steps:

``train_images_per_s``
    the whole training step of :meth:`Trainer.train_one_epoch` (batch
    augmentation, student forward, teacher forward, strategy loss, backward,
    optimizer/scheduler update), see :func:`train_step`, on batches pre-drawn
    from the recipe's real training loader and kept in memory, so data
    loading is not part of it.
``eval_images_per_s``
    the student in eval mode (``torch.no_grad``, the recipe's precision, both
    heads as :func:`deitctl.evaluation.evaluate` runs them) on the same
    in-memory batches.
``train_images_per_s_cached``
    the same step with the teacher's logits read from a cache (``[teacher] cache``, made
    by ``deitctl teach``): the logits the live steps computed, kept in memory, each checked
    against its batch's input checksum as the cache's reader does, then moved to the device;
    the teacher's share is 0. Live and cached steps alternate on the same batches. Without a
    teacher, the same figure as ``train_images_per_s``.
``teacher_share``
    the time of the teacher forward on each step's (mixed) batch, timed inside
    the step by the trainer's :class:`~deitctl.events.StepClock`, over the step's
    time (0 without a teacher). On CUDA the teacher call is bracketed by two
    synchronisations, which the step time includes.
``data_images_per_s``
    the recipe's training loader alone (its transforms and worker processes),
    counted from its second batch, so worker start-up is left out.
``machine``
    what ran it (:func:`deitctl.machine.machine_info`): CPU model and flags or GPU name,
    torch version, threads.
``flops_per_image``
    the student's forward and backward plus the teacher's forward on one training image,
    counted by ``torch.utils.flop_counter``.
``matmul_utilization``
    the training step's achieved FLOP/s (``flops_per_image`` × ``train_images_per_s``) over
    the best dense-matmul FLOP/s of this device in any precision the run may use, measured
    in the same invocation (``matmul_flops_per_s``, per precision).
``bound``, ``verdict``
    what limits the run: ``data`` (the loader with the recipe's workers is slower than the
    step), ``teacher`` (the teacher's forward is at least :data:`TEACHER_BOUND` of the step) or
    ``compute``, and what would help.
``peak_memory_mb``
    on CUDA ``torch.cuda.max_memory_allocated`` over the training and
    evaluation steps; on CPU the growth of the process' peak resident set
    size from before the parts were built (Linux: free heap memory is returned
    to the system and the kernel's peak mark reset first, so earlier work in the
    same process does not hide it; elsewhere ``getrusage``'s lifetime peak).
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deitctl.data import release_workers
from deitctl.machine import synchronize
from deitctl.recipe import Recipe
from deitctl.teacher_cache import input_checksum
from deitctl.teacher_source import CachedTeacher, TeacherSource
from deitctl.trainer import Trainer

if TYPE_CHECKING:
    from rich.table import Table

KEYS = (
    "train_images_per_s",
    "train_images_per_s_cached",
    "eval_images_per_s",
    "teacher_share",
    "data_images_per_s",
    "peak_memory_mb",
)
MAX_KEPT_BATCHES = 8  # distinct in-memory batches, cycled through
TEACHER_BOUND = 0.4  # the teacher's share of the step from which the run is teacher-bound


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


class _HostPeak:
    """Growth of this process' peak resident set size from now on."""

    def __init__(self) -> None:
        from deitctl.runtime import release_freed_memory

        try:
            release_freed_memory()  # memory kept from earlier work would be reused unseen
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to VmRSS (Linux >= 4.0)
            self.before, self.exact = _proc_status_mb("VmRSS"), True
        except OSError:
            self.before, self.exact = _peak_rss_mb(), False

    def growth_mb(self) -> float:
        if self.exact:
            return max(0.0, _proc_status_mb("VmHWM") - self.before)
        return _peak_rss_mb() - self.before


def train_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor, step: int = 0) -> None:
    """One training step, exactly the engine's (:meth:`Trainer.train_step`).
    timm's Mixup works in place on ``images``: pass a copy of a batch used again."""
    loss_value = trainer.train_step(images, targets, step=step)
    trainer.reporter.step(images.shape[0], loss_value, trainer.optimizer.param_groups[0]["lr"])


def draw_batches(loader: Any, count: int, keep: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """``count`` batches from the loader (epochs repeated as needed); returns the
    first ``keep`` of them and the loader's images/s from the second batch on."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    images, started, epoch, drawn = 0, 0.0, 0, 0
    while drawn < count:
        loader.set_epoch(epoch)
        for x, y in loader:
            if drawn == 0:
                started = time.perf_counter()  # worker start-up and the first fetch are left out
            else:
                images += x.shape[0]
            if len(kept) < keep:
                kept.append((x, y))
            drawn += 1
            if drawn >= count:
                break
        epoch += 1
    elapsed = time.perf_counter() - started
    if images == 0:  # a single batch: count it, start-up included
        return kept, kept[0][0].shape[0] / max(elapsed, 1e-9)
    return kept, images / max(elapsed, 1e-9)


class _Kept:
    """The teacher's logits of the live steps, replayed as a cache replays them."""

    def __init__(self, live: TeacherSource) -> None:
        self.live = live
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def logits(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        out = self.live.logits(images, epoch, step)
        self.kept[step] = (input_checksum(images).float().cpu(), out.cpu())
        return out

    def has(self, epoch: int) -> bool:
        return True

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kept[step]


def _prepare(recipe: Recipe, warn: Callable[[str], None]) -> Recipe:
    """A copy of the recipe that needs no teacher training: a teacher checkpoint
    that does not exist yet is replaced by random weights (speed does not
    depend on the weights); the live teacher is measured, and its outputs
    replayed for the cached step, whether or not the recipe names a cache."""
    r = copy.deepcopy(recipe)
    t = r.teacher
    if t is not None:
        t.cache = ""
    if r.uses_teacher and t is not None and (t.checkpoint or t.download) and not Path(t.checkpoint).is_file():
        warn(f"teacher weights {t.checkpoint or t.download} are not here; benchmarking the teacher with random weights")
        t.checkpoint = t.download = ""
    return r


def run_benchmark(
    recipe: Recipe,
    *,
    steps: int = 20,
    warmup: int = 3,
    data_batches: int = 0,
    tune: bool = False,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Measure a recipe; returns the figures of :data:`KEYS` and the ones described above.
    ``tune``: first time every speed candidate (``tuning``: the table; ``tuned``: what a
    recipe with every speed key on ``"auto"`` would take)."""
    from deitctl.evaluation import student_heads
    from deitctl.machine import flops_per_image, machine_info, matmul_peak, precisions_available

    steps, warmup = max(1, steps), max(0, warmup)
    recipe = _prepare(recipe, warn)
    host_peak = _HostPeak()
    trainer = Trainer(recipe, tune=tune)  # builds every part; writes nothing
    device = trainer.device
    machine = machine_info(device)

    # the real loader alone, and the in-memory batches for the model steps
    loader = trainer.parts.train_loader
    count = max(data_batches or min(len(loader), 50), warmup + steps, 2)
    batches, data_rate = draw_batches(loader, count, keep=min(warmup + steps, MAX_KEPT_BATCHES))
    release_workers(loader)  # idle from here on; nothing of theirs competes with the model steps

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batches[i % len(batches)]
        return x.clone(), y.clone()  # Mixup works in place: keep the drawn batch intact

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # training steps; the teacher's forward is timed inside each step; with a teacher, each
    # live step is followed by the same step reading the live step's logits as a cache would
    trainer.student.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    clock = trainer.clock
    clock.enabled = True
    step_time = teacher_time = cached_time = 0.0
    images = 0
    variants: list[tuple[str, TeacherSource | None]] = [("live", None)]
    if trainer.uses_teacher and trainer.teachers is not None:
        kept = _Kept(trainer.teachers)
        variants = [("live", kept), ("cached", CachedTeacher(kept, None, where="benchmark"))]
    try:
        for i in range(warmup + steps):
            for variant, source in variants:
                if source is not None:
                    trainer.teachers = source
                x, y = batch(i)
                synchronize(device)
                clock.reset()
                t0 = time.perf_counter()
                train_step(trainer, x, y, step=i)
                synchronize(device)
                if i >= warmup and variant == "cached":
                    cached_time += time.perf_counter() - t0
                elif i >= warmup:
                    step_time += time.perf_counter() - t0
                    teacher_time += clock.seconds["teacher"]
                    images += x.shape[0]
    finally:
        clock.enabled = False
    train_rate = images / max(step_time, 1e-9)
    cached_rate = images / max(cached_time, 1e-9) if len(variants) > 1 else train_rate
    share = teacher_time / max(step_time, 1e-9)

    # evaluation forward of the student alone
    model = trainer.student
    model.eval()
    eval_time, eval_images = 0.0, 0
    with torch.no_grad():
        for i in range(warmup + steps):
            x, _ = batch(i)
            synchronize(device)
            t0 = time.perf_counter()
            x = x.to(device, non_blocking=True)
            with trainer.autocast():
                student_heads(model, x)
            synchronize(device)
            if i >= warmup:
                eval_time += time.perf_counter() - t0
                eval_images += x.shape[0]
    model.train()

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = host_peak.growth_mb()

    # the step against this machine's own limit
    x = batch(0)[0].to(device)
    teacher = trainer.teacher if trainer.uses_teacher and not trainer.cache else None
    flops = flops_per_image(trainer.student, teacher, x)
    trainer.optimizer.zero_grad(set_to_none=True)
    matmul = matmul_peak(device, precisions_available(device, recipe.run.precision))
    result: dict[str, Any] = {
        "train_images_per_s": train_rate,
        "train_images_per_s_cached": cached_rate,
        "eval_images_per_s": eval_images / max(eval_time, 1e-9),
        "teacher_share": share,
        "data_images_per_s": data_rate,
        "peak_memory_mb": peak,
        "machine": machine,
        "speed": trainer.tuning.speed.label(),
        "flops_per_image": flops,
        "matmul_flops_per_s": matmul,
        "matmul_utilization": flops * train_rate / max(matmul.values()),
    }
    result.update(verdict(result, recipe))
    if trainer.tuned is not None:
        result["tuning"] = trainer.tuned.rows
        result["tuned"] = trainer.tuned.speed.label()
    return result


def verdict(result: dict[str, Any], recipe: Recipe) -> dict[str, str]:
    """``bound`` (data, teacher or compute) and a sentence with the figures and what helps."""
    train, data = result["train_images_per_s"], result["data_images_per_s"]
    share, cached = result["teacher_share"], result["train_images_per_s_cached"]
    workers = recipe.data.num_workers
    if data < train:
        return {
            "bound": "data",
            "verdict": f"data-bound: the loader gives {data:.0f} img/s with {workers} workers, the step "
            f"{train:.0f} img/s. More workers (data.num_workers, up to the cores), decoded images in RAM "
            "(data.cache_mb), or shards with smaller images (deitctl data pack --max-side) would help.",
        }
    if share >= TEACHER_BOUND:
        return {
            "bound": "teacher",
            "verdict": f"teacher-bound: the teacher's forward is {share:.0%} of the step. Its outputs taught "
            f"once (deitctl teach, then [teacher] cache) make the step {cached:.0f} img/s instead of "
            f"{train:.0f} img/s.",
        }
    run = recipe.run
    fixed = [k for k in ("precision", "compile") if getattr(run, k) != "auto"]
    hint = (
        f' Setting run.{" and run.".join(fixed)} = "auto" lets deitctl measure the faster settings on this machine.'
        if fixed
        else ""
    )
    if share >= 0.2:
        hint += (
            f" The teacher is {share:.0%} of the step: its outputs from a cache (deitctl teach) would make it "
            f"{cached:.0f} img/s."
        )
    return {
        "bound": "compute",
        "verdict": f"compute-bound: the step at {train:.0f} img/s uses {result['matmul_utilization']:.0%} "
        f"of this device's dense-matmul FLOP/s (the loader keeps up at {data:.0f} img/s).{hint}",
    }


def results_table(result: dict[str, Any], recipe: Recipe, *, steps: int, warmup: int) -> Table:
    """The figures as a rich table."""
    from rich.table import Table

    from deitctl.machine import describe

    d = recipe.data
    table = Table(
        title=f"{recipe.run.name}: batch {d.batch_size}, {d.img_size} px, {result['speed']}; "
        f"{steps} steps after {warmup} warm-up\non {describe(result['machine'])}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("what")
    table.add_row(
        "train",
        f"{result['train_images_per_s']:.1f} img/s",
        "whole training step on in-memory batches (mixup, student fwd+bwd, teacher fwd, optimizer)",
    )
    table.add_row(
        "train, cached teacher",
        f"{result['train_images_per_s_cached']:.1f} img/s",
        "the same step with the teacher's logits from a cache (deitctl teach): teacher share 0",
    )
    table.add_row("eval", f"{result['eval_images_per_s']:.1f} img/s", "student forward, eval mode, no grad")
    table.add_row(
        "teacher share", f"{result['teacher_share'] * 100:.1f} %", "of the training step spent in the teacher forward"
    )
    table.add_row(
        "data",
        f"{result['data_images_per_s']:.1f} img/s",
        f"the training loader alone ({d.num_workers} workers, its transforms)",
    )
    table.add_row(
        "FLOPs per image",
        f"{result['flops_per_image'] / 1e9:.2f} GFLOP",
        "student forward and backward, teacher forward (torch.utils.flop_counter)",
    )
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in result["matmul_flops_per_s"].items())
    table.add_row(
        "matmul utilization",
        f"{result['matmul_utilization'] * 100:.1f} %",
        f"the step's FLOP/s over the best dense matmul here (GFLOP/s: {peaks})",
    )
    cuda = result["machine"]["device"] == "cuda"
    table.add_row(
        "memory",
        f"{result['peak_memory_mb']:.1f} MB",
        "CUDA max allocated" if cuda else "growth of the process' peak RSS (CPU)",
    )
    return table


def tuning_table(result: dict[str, Any]) -> Table:
    """``--tune``: every speed candidate, timed on this machine."""
    from rich.table import Table

    from deitctl.tuning import row_label

    table = Table(title=f'speed candidates (run.* = "auto" takes: {result["tuned"]})')
    table.add_column("settings")
    table.add_column("ms/step", justify="right")
    table.add_column("compile s", justify="right")
    rows = result["tuning"]
    for row in rows:
        label = row_label(row)
        table.add_row(label, f"{row['step_s'] * 1000:.1f}", f"{row['compile_s']:.1f}" if row["compile"] else "")
    return table
