"""Deep recipe checks that need the plugins and models, but no data or weights."""

from __future__ import annotations

from pathlib import Path

from deitctl.errors import RecipeError
from deitctl.recipe import Recipe


def validate(recipe: Recipe) -> list[str]:
    """Raise on anything that would stop a run; return warnings for what may
    be fine later (absent data, a teacher checkpoint not yet trained)."""
    import torch

    from deitctl.build import build_augmentation, build_strategy, build_student, build_teacher, check_student_strategy, normalization
    from deitctl.engine import num_classes_of, resolve_device

    notes = list(recipe.warnings)
    resolve_device(recipe)
    root = Path(recipe.data.root)
    if recipe.data.dataset == "imagefolder":
        for split in (recipe.data.train_split, recipe.data.val_split):
            if not (root / split).is_dir():
                notes.append(f"data: {root / split} does not exist here (needed to train or evaluate)")
    strategy = build_strategy(recipe)
    num_classes = num_classes_of(recipe) or 1000
    with torch.device("meta"):
        student = build_student(recipe, num_classes)
        check_student_strategy(recipe, student, strategy)
        mean, std = normalization(student)
        if recipe.teacher is not None:
            build_teacher(recipe, num_classes, mean, std, load=False)
    build_augmentation(recipe, mean, std, num_classes)
    if recipe.student.checkpoint and not Path(recipe.student.checkpoint).is_file():
        notes.append(f"student: checkpoint {recipe.student.checkpoint} does not exist here (needed to train)")
    t = recipe.teacher
    if t is not None and t.checkpoint and not Path(t.checkpoint).is_file():
        if t.recipe and recipe.uses_teacher:
            if not Path(t.recipe).is_file():
                raise RecipeError(f"no such teacher recipe {t.recipe!r}", source=recipe.source, key="teacher.recipe")
            notes.append(f"teacher: {t.checkpoint} does not exist yet; `deitctl train` will train it first with {t.recipe}")
        else:
            notes.append(f"teacher: checkpoint {t.checkpoint} does not exist here (needed to train)")
    if t is not None and t.recipe and not t.checkpoint:
        raise RecipeError("a teacher recipe needs [teacher] checkpoint: the file its run produces (e.g. runs/teacher/best.pt)",
                          source=recipe.source, key="teacher.checkpoint")
    return notes
