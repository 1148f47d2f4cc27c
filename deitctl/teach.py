"""``deitctl teach``: a recipe's training stream through its teacher alone, into a cache.

The stream is the one training sees, process by process: each process's share of the
sampler's order (repeated augmentation included), each sample's augmentation (seeded from
(seed, epoch, position)), each step's Mixup/CutMix (seeded from (seed, epoch, step, rank)).
None of it depends on the student, so the student is built only on PyTorch's ``meta``
device, for its input normalisation. One process replays the stream of every process of a
world of ``world_size``; under torchrun the launched processes share the work.

Shards are written atomically, and an epoch is recorded once all its shards are there:
a teach that was stopped continues where it stopped, and epochs taught elsewhere combine.
"""

from __future__ import annotations

import errno
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deitctl import __version__
from deitctl.assembly import (
    LateTransform,
    bind_transform,
    build_loader,
    build_train_split,
    check_batch_count,
    decode_threads,
    unreadable_up_front,
)
from deitctl.cache_identity import differences, require_indexed, state_sha256, stream_identity, teacher_identity
from deitctl.checkpoint import atomic_write
from deitctl.compiler import compile_module
from deitctl.distributed import World, barrier
from deitctl.errors import RecipeError, UserError
from deitctl.events import StepClock
from deitctl.factories import build_augmentation, build_student, build_teacher, check_output, normalization
from deitctl.image_cache import cache_decoded
from deitctl.recipe import Recipe
from deitctl.rng import batch_seed, seed_everything, seeded_batch
from deitctl.runtime import autocast_factory, configure_process, resolve_device, set_attention
from deitctl.teacher_cache import (
    FORMAT,
    MANIFEST,
    Layout,
    cached_epochs,
    epoch_record_name,
    input_checksum,
    read_manifest,
    sha256_file,
    shard_bytes,
    write_json,
)
from deitctl.teacher_source import LiveTeacher, epoch_ranges
from deitctl.tuning import Speed, broadcast, is_auto, resolve_speed


@dataclass
class TeachOptions:
    epochs: tuple[int, int] | None = None
    """0-based [start, stop); None: every epoch of the recipe."""
    world_size: int = 0
    """Processes of the training that will read the cache (0: those of this launch)."""
    teacher_batch: int = 0
    """Images per teacher forward, whole steps (0: one step, the batch size)."""
    full_max_classes: int = 100
    top_k: int = 10
    tail_tau: float = 3.0
    shard_steps: int = 500


@dataclass
class TeachResult:
    cache: Path
    layout: Layout
    taught: list[int]
    """Epochs (0-based) this call completed."""
    epochs: list[int]
    """Every complete epoch in the cache now."""
    images_per_s: float
    size_bytes: int


def parse_epochs(text: str, total: int) -> tuple[int, int]:
    """``A:B`` (1-based, both included; ``A:`` to the recipe's last epoch, ``:B`` from the
    first, ``A`` alone) as a 0-based [start, stop)."""
    head, sep, tail = text.partition(":")
    try:
        first = int(head) if head.strip() else 1
        last = (int(tail) if tail.strip() else total) if sep else first
    except ValueError:
        raise UserError(f"--epochs {text!r}: expected A:B, epochs counted from 1 (e.g. 1:150)") from None
    if first < 1 or last < first:
        raise UserError(f"--epochs {text!r}: expected 1 <= A <= B")
    return first - 1, last


@dataclass
class _Stream:
    """What teaching needs: the loader of the stream, its batch transform, the teacher."""

    loader: Any
    mixup: Any
    teacher: LiveTeacher
    autocast: Callable[[], Any]
    device: torch.device
    identity: dict[str, Any]
    layout: Layout


def _build(recipe: Recipe, options: TeachOptions, world_size: int, world: World, log: Callable[[str], None]) -> _Stream:
    """The training data and augmentation, the student on ``meta`` (its normalisation), and
    the teacher on the device at the recipe's speed settings (``"auto"``: the same choice as
    training, from the same measurement, so cached and live logits agree)."""
    run, t = recipe.run, recipe.teacher
    assert t is not None
    seed_everything(run.seed)
    configure_process(run.threads, run.retain_host_memory)
    device = resolve_device(recipe)
    late = LateTransform()
    train_ds, classes = build_train_split(recipe, late)
    require_indexed(recipe, train_ds)
    num_classes = len(classes)
    with torch.device("meta"):
        mean, std = normalization(build_student(recipe, num_classes))
    frozen = build_teacher(recipe, num_classes, mean, std)
    check_output(recipe, frozen, num_classes, "teacher")
    state = state_sha256(frozen.model)
    aug = build_augmentation(recipe, mean, std, num_classes)
    bind_transform(train_ds, late, aug.train_transform)
    cache_decoded(train_ds, limit_mb=recipe.data.cache_mb, threads=decode_threads(recipe))
    notes: list[str] = []
    (train_ds,), _ = unreadable_up_front(recipe, [train_ds], notes)  # the images training will use, exactly
    for note in notes:
        log(note)
    check_batch_count(recipe, train_ds, world_size)
    loader = build_loader(recipe, train_ds, device, train=True, num_replicas=world_size, rank=0)
    speed = _speed(recipe, device, frozen, num_classes, run.epochs * len(loader), world, log)
    precision = speed.precision
    frozen = frozen.to(device)
    set_attention(frozen, speed.attention)
    if speed.channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)
    forward = compile_module(frozen) if speed.compile else frozen
    teacher = LiveTeacher(forward, StepClock(device), channels_last=speed.channels_last)
    autocast = autocast_factory(device, precision)
    with autocast():
        probe = teacher.logits(torch.zeros(2, 3, recipe.data.img_size, recipe.data.img_size, device=device), 0, 0)
    identity = stream_identity(recipe, train_ds, mean, std, world_size=world_size, precision=precision)
    identity.update(teacher_identity(recipe, state=state))
    full = num_classes <= options.full_max_classes
    layout = Layout(
        num_classes=num_classes,
        storage="full" if full else "topk",
        top_k=0 if full else min(options.top_k, num_classes),
        tail_tau=0.0 if full else options.tail_tau,
        logits_dtype=str(probe.dtype).removeprefix("torch."),
        batch_size=recipe.data.batch_size,
        world_size=world_size,
        steps_per_epoch=len(loader),
        shard_steps=options.shard_steps,
    )
    return _Stream(loader, aug.batch_transform, teacher, autocast, device, identity, layout)


def _speed(
    recipe: Recipe,
    device: torch.device,
    teacher: torch.nn.Module,
    num_classes: int,
    total_steps: int,
    world: World,
    log: Callable[[str], None],
) -> Speed:
    """Training's speed settings for this recipe (:func:`deitctl.tuning.resolve_speed`, with
    the recipe's real student): rank 0 decides."""
    tuning = None
    if world.is_main:
        student = build_student(recipe, num_classes) if is_auto(recipe.run) else torch.nn.Identity()
        d = recipe.data
        batch = (d.batch_size, 3, d.img_size, d.img_size)
        tuning = resolve_speed(
            recipe.run,
            device,
            student,
            teacher,
            batch=batch,
            num_classes=num_classes,
            total_steps=total_steps,
            source=recipe.source,
        )
        log(tuning.summary())
    return broadcast(tuning).speed


def _disk_error(path: Path, exc: OSError) -> UserError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return UserError(
        f"{path}: cannot write ({exc.strerror or exc}); nothing half-written was kept"
        + ("; free some space, then run the same `deitctl teach` again: it continues where it stopped" if full else "")
    )


def _open_cache(recipe: Recipe, cache: Path, stream: _Stream, world: World) -> None:
    """Write the manifest of a new cache; check an existing one against this recipe."""
    if world.is_main and not (cache / MANIFEST).exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            new: dict[str, Any] = {
                "format": FORMAT,
                "deitctl_version": __version__,
                "recipe": recipe.source,
                "identity": stream.identity,
                "layout": asdict(stream.layout),
            }
            write_json(cache / MANIFEST, new)
        except OSError as exc:
            raise _disk_error(cache / MANIFEST, exc) from exc
    barrier()
    manifest, layout = read_manifest(cache)
    diffs = differences(manifest.get("identity", {}), stream.identity)
    if diffs:
        raise RecipeError(
            f"{cache / MANIFEST}: refusing to add epochs to a cache taught for another recipe; it differs in "
            + "; ".join(diffs),
            source=recipe.source,
            key="teacher.cache",
        )
    mine = stream.layout
    for name in ("storage", "top_k", "tail_tau", "shard_steps", "logits_dtype", "steps_per_epoch", "num_classes"):
        if getattr(layout, name) != getattr(mine, name):
            raise UserError(
                f"{cache / MANIFEST}: the cache stores {name} = {getattr(layout, name)!r}, this teach "
                f"{getattr(mine, name)!r} (use the cache's --full-max-classes, --top-k, --tail-tau, --shard-steps)"
            )


def _teach_shard(stream: _Stream, cache: Path, seed: int, epoch: int, rank: int, start: int, batch: int) -> int:
    """One shard: the steps from ``start`` of process ``rank``'s stream in ``epoch``."""
    layout, loader = stream.layout, stream.loader
    steps = min(layout.shard_steps, layout.steps_per_epoch - start)
    loader.sampler.set_rank(rank)
    loader.sampler.set_epoch(epoch, skip=start * layout.batch_size)
    logits: list[torch.Tensor] = []
    checksums: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        with stream.autocast():
            out = stream.teacher.logits(torch.cat(pending), epoch, start)
        logits.extend(out.float().cpu().split(layout.batch_size))
        pending.clear()

    for i, (images, targets) in enumerate(itertools.islice(loader, steps)):
        images = images.to(stream.device, non_blocking=True)
        if stream.mixup is not None:
            targets = targets.to(stream.device, non_blocking=True)
            images, _ = seeded_batch(stream.mixup, images, targets, batch_seed(seed, epoch, start + i, rank))
        checksums.append(input_checksum(images))
        pending.append(images)
        if len(pending) * layout.batch_size >= batch:
            flush()
    if pending:
        flush()
    if len(logits) != steps:
        raise RuntimeError(f"epoch {epoch + 1}, process {rank}: {len(logits)} steps from the loader, expected {steps}")
    name = layout.shard_name(epoch, rank, start)
    data = shard_bytes(torch.stack(logits), torch.stack(checksums), layout)
    try:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache / name, lambda f: f.write(data))
    except OSError as exc:
        raise _disk_error(cache / name, exc) from exc
    return steps * layout.batch_size


def _whole_shard(path: Path, layout: Layout, start: int) -> bool:
    """A shard file that is there and whole (a copy may have cut it short)."""
    from safetensors.torch import load

    if not path.is_file():
        return False
    steps = min(layout.shard_steps, layout.steps_per_epoch - start)
    try:
        tensors = load(path.read_bytes())
    except Exception:
        return False
    return all(t.shape[:2] == (steps, layout.batch_size) for k, t in tensors.items() if k != "checksum")


def _record_epoch(cache: Path, layout: Layout, epoch: int) -> None:
    shards = []
    for rank in range(layout.world_size):
        for start in layout.shard_starts():
            name = layout.shard_name(epoch, rank, start)
            path = cache / name
            steps = min(layout.shard_steps, layout.steps_per_epoch - start)
            size = path.stat().st_size
            shards.append(
                {"file": name, "rank": rank, "start": start, "steps": steps, "bytes": size, "sha256": sha256_file(path)}
            )
    try:
        write_json(cache / epoch_record_name(epoch), {"epoch": epoch + 1, "shards": shards})
    except OSError as exc:
        raise _disk_error(cache / epoch_record_name(epoch), exc) from exc


def teach(
    recipe: Recipe,
    cache: Path,
    options: TeachOptions,
    *,
    world: World | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> TeachResult:
    """Write the teacher's outputs for ``options.epochs`` of the recipe's stream into ``cache``."""
    world = world or World()
    if recipe.teacher is None:
        raise RecipeError("deitctl teach needs a [teacher] section", source=recipe.source, key="teacher")
    t = recipe.teacher
    if t.checkpoint and not Path(t.checkpoint).is_file():
        raise RecipeError(f"no such file {t.checkpoint!r}", source=recipe.source, key="teacher.checkpoint")
    world_size = options.world_size or world.world_size
    stream = _build(recipe, options, world_size, world, log)
    _open_cache(recipe, cache, stream, world)
    layout = stream.layout
    start, stop = options.epochs or (0, recipe.run.epochs)
    done = cached_epochs(cache, layout)
    todo = [e for e in range(start, stop) if e not in done]
    if done.keys() & set(range(start, stop)):
        log(f"{cache}: {epoch_ranges(sorted(done.keys() & set(range(start, stop))))} taught already")
    batch = max(options.teacher_batch, layout.batch_size)
    started, images = time.perf_counter(), 0
    for epoch in todo:
        units = [(r, s) for r in range(layout.world_size) for s in layout.shard_starts()]
        mine = units[world.rank :: world.world_size]
        epoch_started, epoch_images, kept = time.perf_counter(), 0, 0
        for rank, first in mine:
            if _whole_shard(cache / layout.shard_name(epoch, rank, first), layout, first):
                kept += 1  # written by a teach that stopped before recording the epoch
                continue
            epoch_images += _teach_shard(stream, cache, recipe.run.seed, epoch, rank, first, batch)
        barrier()
        if world.is_main:
            _record_epoch(cache, layout, epoch)
        images += epoch_images
        seconds = time.perf_counter() - epoch_started
        log(
            f"epoch {epoch + 1}: {_count(len(mine) - kept, 'shard')}, {epoch_images} images in {seconds:.1f} s "
            f"({epoch_images / max(seconds, 1e-9):.0f} img/s)"
            + (f"; {_count(kept, 'shard')} there already" if kept else "")
        )
    barrier()
    epochs = sorted(cached_epochs(cache, layout))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    rate = images / max(time.perf_counter() - started, 1e-9)
    return TeachResult(cache, layout, todo, epochs, rate, size)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}es" if what.endswith("s") else f"{n} {what}s"


def bytes_per_image(layout: Layout) -> float:
    """What a cache stores per training image: its logits, and a share of its step's checksum."""
    index = 2 if layout.num_classes <= 2**15 else 4
    if layout.storage == "full":
        per = 4 * layout.num_classes
    else:
        fill = 2 if layout.top_k and layout.tail_tau > 0 and layout.num_classes > layout.top_k else 0
        per = index + layout.top_k * (2 + index) + fill
    return per + 16 / layout.batch_size


def describe(result: TeachResult) -> str:
    layout = result.layout
    if layout.storage == "full":
        what = f"{layout.num_classes} logits (fp32)"
    elif layout.top_k:
        what = f"argmax and top-{layout.top_k} logits (fp16)"
    else:
        what = "argmax (hard targets)"
    epochs = epoch_ranges(result.epochs) if result.epochs else "no epochs"
    return (
        f"{result.cache}: {epochs} of a stream of {_count(layout.world_size, 'process')}, {layout.steps_per_epoch} "
        f"steps of {layout.batch_size} images an epoch each; {what} per image ({bytes_per_image(layout):.1f} bytes), "
        f"{math.ceil(result.size_bytes / 2**20)} MiB"
    )
