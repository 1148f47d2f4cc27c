"""Assembly: a recipe's parts, each built once through the plugin registry.

The order follows what each part needs. The data comes first: the training split gives the
class list. Then the student (its input normalisation), the strategy (checked against the
student), the teacher, and the augmentation, whose transforms the datasets take from then
on (:class:`LateTransform`). Last, the loaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deitctl.api import Augmentation, Strategy
from deitctl.data import Loader, base_and_indices, empty_class_folders, make_loader, per_class_subset, without_files
from deitctl.distributed import World
from deitctl.errors import RecipeError, UserError
from deitctl.factories import (
    Stats,
    build_augmentation,
    build_dataset,
    build_strategy,
    build_student,
    build_teacher,
    check_output,
    check_student_strategy,
    normalization,
)
from deitctl.image_cache import cache_decoded, unreadable_found
from deitctl.recipe import Recipe
from deitctl.runtime import resolve_device
from deitctl.teacher import FrozenTeacher

DEFAULT_NUM_CLASSES = 1000  # a dataset that names no classes, with no [data] num_classes


@dataclass
class Parts:
    """Everything a run is made of."""

    recipe: Recipe
    device: torch.device
    classes: list[str]
    mean: Stats
    std: Stats
    student: nn.Module
    strategy: Strategy
    augmentation: Augmentation
    train_loader: Loader
    val_loader: Loader
    teacher: FrozenTeacher | None = None
    notes: list[str] = field(default_factory=list)
    """What assembly did that the run's log should say (checkpoint init, image cache)."""
    dropped_images: int = 0
    """Unreadable training images left out at start-up (``bad_images = "skip"``)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- data and classes


class LateTransform:
    """A split's transform, given to the dataset before the augmentation exists (the
    augmentation needs the class count, which comes from the data): :func:`bind_transform`
    puts the real transform in its place."""

    def __init__(self) -> None:
        self.transform: Callable[[Any], Any] | None = None

    def __call__(self, sample: Any) -> Any:
        if self.transform is None:
            raise RuntimeError("a dataset used its transform before the augmentation was built")
        return self.transform(sample)


def bind_transform(dataset: Any, late: LateTransform, transform: Callable[[Any], Any]) -> None:
    """Give ``late`` its transform, and put it in the dataset's ``transform`` attribute where
    the dataset keeps the placeholder there (the loaders look at that attribute)."""
    late.transform = transform
    base, _ = base_and_indices(dataset)
    if getattr(base, "transform", None) is late:
        base.transform = transform


def class_list(recipe: Recipe, dataset: Any) -> list[str]:
    """The run's classes: the training split's ``classes``, checked against ``[data] num_classes``."""
    classes = [str(c) for c in getattr(dataset, "classes", None) or []]
    wanted = recipe.data.num_classes
    if classes and wanted and len(classes) != wanted:
        raise RecipeError(
            f"is {wanted} but the dataset has {len(classes)} classes", source=recipe.source, key="data.num_classes"
        )
    return classes or [str(i) for i in range(wanted or DEFAULT_NUM_CLASSES)]


def align_classes(dataset: Any, classes: Sequence[str]) -> list[str]:
    """Renumber a split's targets to the order of ``classes``; returns the split's classes
    that ``classes`` lacks (nothing is changed then)."""
    own = [str(c) for c in getattr(dataset, "classes", None) or []]
    known = set(classes)
    unknown = [c for c in own if c not in known]
    if not unknown and own and own != list(classes) and hasattr(dataset, "targets"):
        remap = [list(classes).index(c) for c in own]
        dataset.target_transform = remap.__getitem__
        dataset.targets = [remap[t] for t in dataset.targets]
    return unknown


def build_train_split(recipe: Recipe, transform: Callable[[Any], Any] | None) -> tuple[Any, list[str]]:
    """(training images, classes): the training split, ``train_per_class`` of each class."""
    train = build_dataset(recipe, recipe.data.train_split, transform)
    return per_class_subset(train, recipe.data.train_per_class), class_list(recipe, train)


def build_datasets(
    recipe: Recipe, train_transform: Callable[[Any], Any] | None, val_transform: Callable[[Any], Any] | None
) -> tuple[Any, Any, list[str]]:
    """(train, val, classes): the validation split renumbered to the training split's classes."""
    d = recipe.data
    train, classes = build_train_split(recipe, train_transform)
    val = build_dataset(recipe, d.val_split, val_transform)
    unknown = align_classes(val, classes)
    if unknown:
        raise RecipeError(
            f"the {d.val_split!r} split has classes that {d.train_split!r} has not: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}",
            source=recipe.source,
            key="data.val_split",
        )
    return train, per_class_subset(val, d.val_per_class), classes


def decode_threads(recipe: Recipe) -> int:
    """Threads that fill the image cache: as many as the loader has workers, within the CPU count."""
    return max(1, min(recipe.data.num_workers, os.cpu_count() or 1))


# --------------------------------------------------------------------------- the whole


MAX_LISTED = 20


def _listing(paths: Sequence[str]) -> str:
    """Every path, or the first 20 and a count."""
    shown = [f"  {p}" for p in paths[:MAX_LISTED]]
    if len(paths) > MAX_LISTED:
        shown.append(f"  ... and {len(paths) - MAX_LISTED} more")
    return "\n".join(shown)


@contextmanager
def _naming_empty_folders(empty: Sequence[str]) -> Iterator[None]:
    """An error while the models are built also names the empty class folders: each still
    counts as a class, so it changes the class count that models and checkpoints must fit."""
    try:
        yield
    except UserError as exc:
        if not empty:
            raise
        note = (
            f"; note: {', '.join(empty)} {'is an empty class folder' if len(empty) == 1 else 'are empty class folders'}"
        )
        note += ", counted as a class"
        if isinstance(exc, RecipeError):
            raise RecipeError(exc.detail + note, source=exc.source, key=exc.key) from exc
        raise UserError(str(exc) + note) from exc


def unreadable_up_front(recipe: Recipe, datasets: list[Any], notes: list[str]) -> tuple[list[Any], int]:
    """Unreadable images the start-up decode found: stop (``bad_images = "error"``) or leave
    them out now (``"skip"``). Returns the datasets and how many training images were left out."""
    found: dict[str, str] = {}
    for ds in datasets:
        found.update(unreadable_found(ds))
    if not found:
        return datasets, 0
    listing = _listing([f"{path} ({error})" for path, error in found.items()])
    if recipe.data.bad_images == "error":
        raise UserError(
            f"data: {len(found)} unreadable image{'s' if len(found) > 1 else ''} found at start-up:\n{listing}\n"
            'fix or remove them, or set [data] bad_images = "skip" to leave them out'
        )
    notes.append(f"warning: {len(found)} unreadable images left out:\n{listing}")
    before = len(datasets[0])
    kept = [without_files(ds, found) for ds in datasets]
    return kept, before - len(kept[0])


def assemble(recipe: Recipe, *, world: World | None = None, with_teacher: bool | None = None) -> Parts:
    """Build a run's data, models, augmentation, loss and loaders from its recipe."""
    from deitctl.finetune import init_student
    from deitctl.weights import is_remote, teacher_source

    world = world or World()
    device = resolve_device(recipe)
    train_tf, val_tf = LateTransform(), LateTransform()
    train_ds, val_ds, classes = build_datasets(recipe, train_tf, val_tf)
    num_classes = len(classes)
    empty = [*empty_class_folders(train_ds), *empty_class_folders(val_ds)]
    notes = [f"warning: class folder {path} has no images; it still counts as a class" for path in empty]

    with _naming_empty_folders(empty):
        student = build_student(recipe, num_classes)
        checkpoint = recipe.student.checkpoint
        if checkpoint:
            changes = init_student(student, checkpoint, recipe) or ["every weight as saved"]
            notes += [f"student initialised from {checkpoint}: {change}" for change in changes]
        check_output(recipe, student, num_classes, "student")
        strategy = build_strategy(recipe)
        check_student_strategy(recipe, student, strategy)
        mean, std = normalization(student)
        teacher = None
        if with_teacher if with_teacher is not None else recipe.uses_teacher:
            teacher = build_teacher(recipe, num_classes, mean, std)
            check_output(recipe, teacher, num_classes, "teacher")
            if is_remote(source := teacher_source(recipe.teacher)):  # type: ignore[arg-type]
                notes.append(f"teacher weights: {source} (downloaded once, then cached)")

    aug = build_augmentation(recipe, mean, std, num_classes)
    bind_transform(train_ds, train_tf, aug.train_transform)
    bind_transform(val_ds, val_tf, aug.eval_transform)

    d = recipe.data
    for split, ds in ((d.train_split, train_ds), (d.val_split, val_ds)):
        if note := cache_decoded(ds, limit_mb=d.cache_mb, threads=decode_threads(recipe)):
            notes.append(f"{split} split: {note}")
    (train_ds, val_ds), dropped = unreadable_up_front(recipe, [train_ds, val_ds], notes)
    check_batch_count(recipe, train_ds, world.world_size)
    train_loader = build_loader(recipe, train_ds, device, train=True, num_replicas=world.world_size, rank=world.rank)
    val_loader = build_loader(recipe, val_ds, device, train=False, num_replicas=world.world_size, rank=world.rank)
    return Parts(
        recipe, device, classes, mean, std, student, strategy, aug, train_loader, val_loader, teacher, notes, dropped
    )


def check_batch_count(recipe: Recipe, train_ds: Any, world_size: int) -> None:
    """At least one batch for every process."""
    if len(train_ds) < recipe.data.batch_size * world_size:
        raise RecipeError(
            f"the training split has {len(train_ds)} images, fewer than one batch "
            f"({recipe.data.batch_size} x {world_size} processes)",
            source=recipe.source,
            key="data.batch_size",
        )


def build_loader(
    recipe: Recipe, dataset: Any, device: torch.device, *, train: bool, num_replicas: int, rank: int
) -> Loader:
    """The loader of a split, for process ``rank`` of ``num_replicas``."""
    d = recipe.data
    return make_loader(
        dataset,
        batch_size=d.batch_size,
        train=train,
        repeats=d.repeated_aug if train else 1,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and device.type == "cuda",
        num_replicas=num_replicas,
        rank=rank,
        seed=recipe.run.seed,
        bad_images=d.bad_images,
        worker_nice=d.worker_nice,
        device=device,
    )
