"""Where the training step gets the teacher's logits: the live teacher (:class:`LiveTeacher`),
or a ``deitctl teach`` cache (:class:`CachedTeacher`) with the live teacher for the epochs the
cache lacks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from deitctl.assembly import Parts
from deitctl.cache_identity import (
    CHECKPOINT,
    differences,
    require_indexed,
    state_sha256,
    stream_identity,
    teacher_identity,
)
from deitctl.errors import RecipeError, UserError
from deitctl.events import StepClock
from deitctl.recipe import Recipe
from deitctl.teacher_cache import (
    CacheReader,
    cached_epochs,
    checksums_match,
    incomplete_epochs,
    input_checksum,
    read_manifest,
)


class TeacherSource(Protocol):
    def logits(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor: ...


class LiveTeacher:
    """The frozen teacher on the student's (augmented, mixed) batch, in inference mode."""

    def __init__(self, forward: nn.Module, clock: StepClock, *, channels_last: bool = False) -> None:
        self.forward, self.clock, self.channels_last = forward, clock, channels_last

    def logits(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        with self.clock.phase("teacher"):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                logits = self.forward(images)
            return logits.clone()  # a normal tensor again: the loss may save it for backward


class BatchStore(Protocol):
    def has(self, epoch: int) -> bool: ...
    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class CachedTeacher:
    """Stored logits, after checking that this step's teacher input is the one they were
    computed from; the live teacher (when given) for the epochs the store lacks."""

    def __init__(self, store: BatchStore, live: LiveTeacher | None, *, where: str) -> None:
        self.store, self.live, self.where = store, live, where

    def logits(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if not self.store.has(epoch):
            if self.live is None:
                raise UserError(f"{self.where}: epoch {epoch + 1} is not in the teacher cache")
            return self.live.logits(images, epoch, step)
        stored, logits = self.store.batch(epoch, step)
        if not checksums_match(stored, input_checksum(images), images.shape):
            raise UserError(
                f"{self.where}: the training stream differs from the cached one at epoch {epoch + 1}, "
                f"step {step + 1}: the teacher's input is not the batch the cache was taught on (another "
                "image, augmentation or Mixup/CutMix; the data, a plugin or deitctl changed). Teach the "
                "cache again for this recipe"
            )
        return logits.to(images.device, non_blocking=True)


def epoch_ranges(epochs: list[int]) -> str:
    """0-based epochs as 1-based ranges: ``1-3, 7``."""
    runs: list[list[int]] = []
    for e in sorted(epochs):
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e + 1, e + 1])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return ("epoch " if len(epochs) == 1 else "epochs ") + text


def open_cache(
    recipe: Recipe, parts: Parts, *, world_size: int, rank: int, precision: str, start_epoch: int
) -> tuple[CacheReader, dict[str, Any], list[int]]:
    """The cache of ``[teacher] cache`` for this process, checked against the recipe (exit 2
    naming the keys that differ); returns it, its manifest and the epochs from
    ``start_epoch`` on that it lacks."""
    t = recipe.teacher
    assert t is not None and t.cache
    cache = Path(t.cache)

    def error(message: str) -> RecipeError:
        return RecipeError(message, source=recipe.source, key="teacher.cache")

    try:
        manifest, layout = read_manifest(cache)
    except UserError as exc:
        raise error(str(exc)) from None
    require_indexed(recipe, parts.train_loader.dataset)
    train_dataset = parts.train_loader.dataset.dataset  # type: ignore[attr-defined]  # under the SeededDataset
    num_classes, steps_per_epoch = parts.num_classes, len(parts.train_loader)
    now = stream_identity(recipe, train_dataset, parts.mean, parts.std, world_size=world_size, precision=precision)
    now.update(teacher_identity(recipe))
    diffs = differences(manifest.get("identity", {}), now)
    if diffs:
        raise error(
            f"{cache / 'manifest.json'}: the cache was taught for another recipe; it differs in "
            + "; ".join(diffs)
            + ". Teach a cache for this recipe (deitctl teach) or use the live teacher (no [teacher] cache)"
        )
    if (layout.num_classes, layout.steps_per_epoch) != (num_classes, steps_per_epoch):
        raise error(
            f"{cache / 'manifest.json'}: {layout.num_classes} classes and {layout.steps_per_epoch} steps an "
            f"epoch, this run has {num_classes} and {steps_per_epoch}"
        )
    epochs = cached_epochs(cache, layout)
    missing = [e for e in range(start_epoch, recipe.run.epochs) if e not in epochs]
    if missing and not live_teacher_available(recipe):
        partial = incomplete_epochs(cache, layout)
        why = "".join(f"; epoch {e + 1} is partial: {partial[e]}" for e in missing if e in partial)
        raise error(
            f"{cache}: the cache lacks {epoch_ranges(missing)}{why}, and the teacher's checkpoint "
            f"{t.checkpoint!r} is not here to run them live. Teach them: deitctl teach {recipe.source} "
            f"--cache {cache} --epochs {missing[0] + 1}:{missing[-1] + 1}"
        )
    return CacheReader(cache, layout, epochs, rank), manifest, missing


def live_teacher_available(recipe: Recipe) -> bool:
    """A teacher whose weights are here: its checkpoint exists (or it names none)."""
    t = recipe.teacher
    return t is not None and (not t.checkpoint or Path(t.checkpoint).is_file())


def check_fallback_teacher(recipe: Recipe, manifest: dict[str, Any], teacher: nn.Module) -> None:
    """The live teacher that runs the epochs a cache lacks must be the one that taught it."""
    taught = manifest.get("identity", {}).get(CHECKPOINT, {}).get("state_sha256")
    teacher = getattr(teacher, "_orig_mod", teacher)  # compiled
    model = getattr(teacher, "model", teacher)  # the plugin's module inside deitctl's FrozenTeacher
    if taught and state_sha256(model) != taught:
        raise RecipeError(
            f"the teacher built to run the epochs the cache {recipe.teacher.cache if recipe.teacher else ''} "
            "lacks has other weights than the teacher that taught the cache",
            source=recipe.source,
            key="teacher.checkpoint",
        )


def cached_source(
    recipe: Recipe,
    parts: Parts,
    build_live: Callable[[], LiveTeacher],
    log: Callable[[str], None],
    **where: Any,
) -> CachedTeacher:
    """:func:`open_cache` (``where``: the process and where the run starts), then the live
    teacher when epochs are missing (logged)."""
    reader, manifest, missing = open_cache(recipe, parts, **where)
    t = recipe.teacher
    assert t is not None
    live = None
    if missing:
        log(
            f"teacher cache {t.cache} lacks {epoch_ranges(missing)}: the live teacher "
            f"({t.checkpoint or t.plugin}) runs for those"
        )
        live = build_live()
        check_fallback_teacher(recipe, manifest, live.forward)
    layout = reader.layout
    what = (
        f"{layout.storage} logits"
        if layout.storage == "full" or layout.top_k
        else "the teacher's argmax alone: hard targets; a soft target is one-hot"
    )
    log(f"teacher outputs read from the cache {t.cache} ({what})")
    return CachedTeacher(reader, live, where=str(t.cache))
