"""Evaluation and prediction from a checkpoint file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.assembly import align_classes
from deitctl.checkpoint import STATE_KEYS, extract_state_dict, load_file, recipe_of_checkpoint
from deitctl.data import (
    BadImageError,
    BadShardError,
    base_and_indices,
    clean_error_message,
    make_loader,
    per_class_subset,
    release_workers,
)
from deitctl.errors import RecipeError, UserError
from deitctl.evaluation import ClassScores, RealLabels, evaluate
from deitctl.factories import (
    Stats,
    build_augmentation,
    build_dataset,
    build_student,
    build_teacher,
    has_dist_token,
    normalization,
)
from deitctl.recipe import Recipe, check_plugins, recipe_from_dict
from deitctl.runtime import (
    autocast_factory,
    configure_process,
    loader_workers,
    resolve_attention,
    resolve_device,
    resolve_precision,
    set_attention,
)
from deitctl.tomlio import apply_overrides
from deitctl.weights import available, teacher_source


def _foreign_recipe(
    ckpt: Path, model: str | None, data: Path | None, state: dict[str, Any], overrides: list[str] | None = None
) -> Recipe:
    """A recipe for official DeiT / timm weights: ``--model`` and ``--data``."""
    if not model or not data:
        raise UserError(f"{ckpt}: not a deitctl checkpoint (no recipe inside); pass --model NAME and --data ROOT")
    import timm

    if not timm.is_model(model):
        raise UserError(f"--model: unknown timm model {model!r}")
    cfg = timm.get_pretrained_cfg(model)
    size = cfg.to_dict().get("input_size", (3, 224, 224))[-1] if cfg is not None else 224
    head = state.get("head.weight", state.get("fc.weight"))
    raw = {
        "student": {"plugin": "deit" if model.startswith("deit") else "timm", "model": model},
        "data": {
            "root": str(data),
            "img_size": int(size),
            "batch_size": 64,
            "num_workers": 4,
            "num_classes": int(head.shape[0]) if head is not None else 0,
        },
        "ema": {"enabled": False},
    }
    apply_overrides(raw, overrides or [])
    recipe = recipe_from_dict(raw, f"{ckpt} (--model {model})")
    check_plugins(recipe)
    return recipe


def load_student(
    ckpt_path: Path,
    *,
    model: str | None = None,
    data: Path | None = None,
    ema: bool = False,
    overrides: list[str] | None = None,
    warn: Callable[[str], None] | None = None,
    loaded: Any = None,
) -> tuple[Recipe, nn.Module, list[str], Stats, Stats]:
    """(recipe, student with weights, classes, mean, std) from a checkpoint (``loaded``:
    its contents, when already read)."""
    ckpt = load_file(ckpt_path) if loaded is None else loaded
    ours = isinstance(ckpt, dict) and isinstance(ckpt.get("recipe"), str)
    if ours:
        recipe = recipe_of_checkpoint(ckpt, ckpt_path, overrides)
        for message in recipe.warnings:
            if warn is not None and message.startswith("teacher left out"):
                warn(message)
        key = "model_ema" if ema else "model"
        if ema and not ckpt.get("model_ema"):
            raise UserError(f"{ckpt_path}: holds no EMA weights")
        state = extract_state_dict(ckpt[key], ckpt_path)
        classes = list(ckpt.get("classes") or [])
    else:
        prefer = ("model_ema", "state_dict_ema", "model", "state_dict") if ema else STATE_KEYS
        state = extract_state_dict(ckpt, ckpt_path, prefer=prefer)
        recipe = _foreign_recipe(ckpt_path, model, data, state, overrides)
        classes = []
    if data is not None:
        recipe.data.root = str(data)
    num_classes = len(classes) or recipe.data.num_classes or 1000
    student = build_student(recipe, num_classes)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{ckpt_path}: weights do not fit the student: {' '.join(str(exc).split())[:500]}") from None
    if ours:
        norm = ckpt.get("normalization") or {}
        mean, std = tuple(norm.get("mean", (0.485, 0.456, 0.406))), tuple(norm.get("std", (0.229, 0.224, 0.225)))
    else:
        mean, std = normalization(student)
    classes = classes or [str(i) for i in range(num_classes)]
    return recipe, student.eval(), classes, mean, std


def evaluate_checkpoint(
    ckpt: Path,
    *,
    data: Path | None = None,
    model: str | None = None,
    split: str | None = None,
    ema: bool = False,
    overrides: list[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The metrics of a checkpoint on one set (its recipe's, or ``data``)."""
    return evaluate_sets(
        ckpt, data=[data] if data else [], model=model, split=split, ema=ema, overrides=overrides, warn=warn
    )[0]


def evaluate_sets(
    ckpt: Path,
    *,
    data: Sequence[Path] = (),
    labels: Sequence[Path] = (),
    confusion: Path | None = None,
    model: str | None = None,
    split: str | None = None,
    ema: bool = False,
    overrides: list[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One checkpoint on each dataset root in ``data`` (the recipe's when empty): one metrics
    dict per set, with per-class top-1; ReaL top-1/top-5 against ``labels`` (one file, or one
    per set); a confusion-matrix figure at ``confusion`` (numbered per set when several)."""
    roots: list[Path | None] = list(data) or [None]
    if labels and len(labels) != len(roots):
        raise UserError(f"--labels: give one per --data, in the same order ({len(roots)} sets, {len(labels)} --labels)")
    if confusion is not None:
        from deitctl.plots import require_matplotlib

        require_matplotlib("--confusion")
    recipe, student, classes, mean, std = load_student(
        ckpt, model=model, data=roots[0], ema=ema, overrides=overrides, warn=warn
    )
    split = split or recipe.data.val_split
    aug = build_augmentation(recipe, mean, std, len(classes))
    device = resolve_device(recipe)
    configure_process(recipe.run.threads, recipe.run.retain_host_memory)
    teacher = None
    t = recipe.teacher
    if t is not None and (not t.checkpoint or available(teacher_source(t))):
        teacher = build_teacher(recipe, len(classes), mean, std).to(device)
    precision = resolve_precision(device, recipe.run.precision)
    attention = resolve_attention(recipe.run.attention)
    for module in (student, teacher):
        if module is not None:
            set_attention(module, attention)
    student = student.to(device)
    results = []
    for number, root in enumerate(roots):
        if root is not None:
            recipe.data.root = str(root)
        dataset = _eval_split(recipe, split, aug.eval_transform, classes, root)
        scores = ClassScores(len(classes))
        real = RealLabels(real_labels(labels[number], dataset, len(classes))) if labels else None
        loader = make_loader(
            dataset,
            batch_size=recipe.data.batch_size,
            train=False,
            seed=recipe.run.seed,
            num_workers=loader_workers(recipe.data.num_workers),
            pin_memory=device.type == "cuda",
            device=device,
        )
        try:
            metrics: dict[str, Any] = evaluate(
                student,
                loader,
                num_classes=len(classes),
                device=device,
                autocast=autocast_factory(device, precision),
                teacher=teacher,
                observe=_both(scores, real),
            )
        except (BadImageError, BadShardError) as exc:
            raise UserError(f"data: {clean_error_message(exc)}") from exc
        finally:
            release_workers(loader)
        metrics.update(split=split, data=recipe.data.root)
        if has_dist_token(student):
            metrics["acc1_fused"] = metrics["acc1"]
        if real is not None:
            metrics.update(real.result(), labels=str(labels[number]))
        metrics["per_class_acc1"] = scores.per_class_acc1(classes)
        if confusion is not None:
            from deitctl.plots import plot_confusion

            path = (
                confusion
                if len(roots) == 1
                else confusion.with_name(f"{confusion.stem}-{number + 1}{confusion.suffix}")
            )
            plot_confusion(scores.matrix(), classes, path, title=f"{ckpt} on {recipe.data.root} ({split})")
            metrics["confusion"] = str(path)
        results.append(metrics)
    return results


Observer = Callable[[torch.Tensor, torch.Tensor], None]


def _both(*observers: Observer | None) -> Observer:
    def observe(logits: torch.Tensor, targets: torch.Tensor) -> None:
        for o in observers:
            if o is not None:
                o(logits, targets)

    return observe


def _eval_split(recipe: Recipe, split: str, transform: Any, classes: list[str], root: Path | None) -> Any:
    """The split to evaluate, its classes numbered as the checkpoint's."""
    dataset = build_dataset(recipe, split, transform, num_classes=len(classes))
    if classes and not classes[0].isdigit() and (unknown := align_classes(dataset, classes)):
        raise RecipeError(
            f"split {split!r} has classes the checkpoint does not know: {', '.join(unknown[:10])}",
            source=str(root or recipe.data.root),
            key="data.root",
        )
    return per_class_subset(dataset, recipe.data.val_per_class)


def real_labels(path: Path, dataset: Any, num_classes: int) -> list[list[int]]:
    """A ReaL-format file's labels in the order ``dataset`` is evaluated. The file lists, for
    each image of the split in file-name order (the ImageNet validation files' numbering),
    its acceptable class indices; an empty list leaves the image out."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: --labels needs a readable JSON file ({exc})") from None
    ok = isinstance(raw, list) and all(
        isinstance(item, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in item) for item in raw
    )
    if not ok:
        raise UserError(f"{path}: --labels needs a JSON list with a list of class indices for each image")
    bad = next((c for item in raw for c in item if not 0 <= c < num_classes), None)
    if bad is not None:
        raise UserError(f"{path}: class index {bad} is out of range: the checkpoint has {num_classes} classes")
    base, indices = base_and_indices(dataset)
    if len(raw) != len(base):
        raise UserError(f"{path}: {len(raw)} entries, but the split has {len(base)} images (one entry per image)")
    samples = getattr(base, "samples", None)
    if samples:  # the i-th entry is the i-th file by name
        by_name = sorted(range(len(samples)), key=lambda i: (os.path.basename(samples[i][0]), samples[i][0]))
        of_sample: list[list[int]] = [[] for _ in samples]
        for entry, i in enumerate(by_name):
            of_sample[i] = raw[entry]
        raw = of_sample
    return [raw[i] for i in indices]


def predict_images(
    ckpt: Path, images: list[Path], *, top_k: int = 5, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    recipe, student, classes, mean, std = load_student(ckpt, warn=warn)
    aug = build_augmentation(recipe, mean, std, len(classes))
    batch = []
    for path in images:
        try:
            with Image.open(path) as img:
                batch.append(aug.eval_transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    with torch.no_grad():
        probs = student(torch.stack(batch)).float().softmax(dim=1)
    k = min(top_k, len(classes))
    values, indices = probs.topk(k, dim=1)
    return [
        {
            "image": str(path),
            "top": [{"class": classes[i], "probability": float(v)} for v, i in zip(vs.tolist(), ix.tolist())],
        }
        for path, vs, ix in zip(images, values, indices)
    ]
