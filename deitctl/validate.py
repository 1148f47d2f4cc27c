"""``deitctl recipe validate``: the deep checks, which build the plugins (models on PyTorch's
``meta`` device: no memory, no weights) and look for the data, but train nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deitctl.errors import RecipeError, UserError
from deitctl.recipe import Recipe
from deitctl.weights import TIMM, available, is_remote, teacher_source, timm_pretrained_cfg


def _split(recipe: Recipe, split: str, notes: list[str]) -> Any:
    """A split of the dataset, or None with a note when it is not here."""
    from deitctl.factories import build_dataset

    try:
        return build_dataset(recipe, split, None)
    except RecipeError as exc:
        if exc.key != "data.root":
            raise
        notes.append(f"data: {exc.detail} does not exist here (needed to train or evaluate)")
        return None


def _remote_weights(recipe: Recipe) -> list[str]:
    """Notes on weights that `deitctl train` downloads; a timm tag that does not exist is an error."""
    sources = [("student", "checkpoint", recipe.student.checkpoint)]
    if recipe.teacher is not None and recipe.uses_teacher:
        source = teacher_source(recipe.teacher)
        key = "download" if source and source == recipe.teacher.download else "checkpoint"
        sources.append(("teacher", key, source))
    notes = []
    for section, key, source in sources:
        if not is_remote(source):
            continue
        if source.startswith(TIMM):
            try:
                timm_pretrained_cfg(source[len(TIMM) :])
            except UserError as exc:
                raise RecipeError(str(exc), source=recipe.source, key=f"{section}.{key}") from None
        notes.append(f"{section}: weights {source} are downloaded at the start of training (once, then cached)")
    return notes


def validate(recipe: Recipe) -> list[str]:
    """Raise on anything that would stop a run; return warnings for what may
    be fine later (absent data, a teacher checkpoint not yet trained)."""
    import torch

    from deitctl.assembly import align_classes, class_list
    from deitctl.factories import (
        build_augmentation,
        build_strategy,
        build_student,
        build_teacher,
        check_student_strategy,
        normalization,
    )
    from deitctl.runtime import resolve_device

    notes = list(recipe.warnings)
    resolve_device(recipe)
    train = _split(recipe, recipe.data.train_split, notes)
    val = _split(recipe, recipe.data.val_split, notes)
    classes = class_list(recipe, train)
    if val is not None and train is not None and (unknown := align_classes(val, classes)):
        raise RecipeError(
            f"the {recipe.data.val_split!r} split has classes that {recipe.data.train_split!r} "
            f"has not: {', '.join(unknown[:10])}",
            source=recipe.source,
            key="data.val_split",
        )
    strategy = build_strategy(recipe)
    with torch.device("meta"):
        student = build_student(recipe, len(classes))
        check_student_strategy(recipe, student, strategy)
        mean, std = normalization(student)
        if recipe.teacher is not None:
            build_teacher(recipe, len(classes), mean, std, load=False)
    build_augmentation(recipe, mean, std, len(classes))
    from deitctl.tracking import build_loggers, close_loggers

    close_loggers(build_loggers(recipe), notes.append)  # their packages are here (nothing is opened)
    notes += _remote_weights(recipe)
    if recipe.student.checkpoint and not available(recipe.student.checkpoint):
        notes.append(f"student: checkpoint {recipe.student.checkpoint} does not exist here (needed to train)")
    t = recipe.teacher
    if t is not None and t.checkpoint and not available(teacher_source(t)):
        if t.recipe and recipe.uses_teacher and not t.cache:
            if not Path(t.recipe).is_file():
                raise RecipeError(f"no such teacher recipe {t.recipe!r}", source=recipe.source, key="teacher.recipe")
            notes.append(
                f"teacher: {t.checkpoint} does not exist yet; `deitctl train` will train it first with {t.recipe}"
            )
        elif t.cache and recipe.uses_teacher:
            notes.append(
                f"teacher: checkpoint {t.checkpoint} does not exist here; the cache {t.cache} must hold every "
                "epoch (an epoch it lacks would need the live teacher)"
            )
        else:
            notes.append(f"teacher: checkpoint {t.checkpoint} does not exist here (needed to train)")
    return notes
