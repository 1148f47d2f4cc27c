"""Evaluation and prediction from a checkpoint file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.assembly import (
    Stats,
    align_classes,
    build_augmentation,
    build_dataset,
    build_student,
    build_teacher,
    has_dist_token,
    normalization,
)
from deitctl.checkpoint import extract_state_dict, load_file, recipe_of_checkpoint
from deitctl.data import make_loader, per_class_subset
from deitctl.errors import RecipeError, UserError
from deitctl.evaluation import evaluate
from deitctl.recipe import Recipe, check_plugins, recipe_from_dict
from deitctl.runtime import (
    autocast_factory,
    configure_process,
    resolve_attention,
    resolve_device,
    resolve_precision,
    set_attention,
)
from deitctl.tomlio import apply_overrides


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
        state = extract_state_dict(
            ckpt,
            ckpt_path,
            prefer=("model_ema", "model", "state_dict") if ema else ("model", "state_dict", "model_ema"),
        )
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
    recipe, student, classes, mean, std = load_student(
        ckpt, model=model, data=data, ema=ema, overrides=overrides, warn=warn
    )
    split = split or recipe.data.val_split
    aug = build_augmentation(recipe, mean, std, len(classes))
    dataset = build_dataset(recipe, split, aug.eval_transform, num_classes=len(classes))
    if classes and not classes[0].isdigit() and (unknown := align_classes(dataset, classes)):
        raise RecipeError(
            f"split {split!r} has classes the checkpoint does not know: {', '.join(unknown[:10])}",
            source=str(data or recipe.data.root),
            key="data.root",
        )
    dataset = per_class_subset(dataset, recipe.data.val_per_class)
    device = resolve_device(recipe)
    configure_process(recipe.run.threads, recipe.run.retain_host_memory)
    teacher = None
    t = recipe.teacher
    if t is not None and (not t.checkpoint or Path(t.checkpoint).is_file()):
        teacher = build_teacher(recipe, len(classes), mean, std).to(device)
    loader = make_loader(
        dataset,
        batch_size=recipe.data.batch_size,
        train=False,
        seed=recipe.run.seed,
        num_workers=min(recipe.data.num_workers, 4),
        pin_memory=device.type == "cuda",
        device=device,
    )
    precision = resolve_precision(device, recipe.run.precision)
    attention = resolve_attention(device, precision, recipe.run.attention)
    for module in (student, teacher):
        if module is not None:
            set_attention(module, attention)
    metrics: dict[str, Any] = evaluate(
        student.to(device),
        loader,
        num_classes=len(classes),
        device=device,
        autocast=autocast_factory(device, precision),
        teacher=teacher,
    )
    metrics["split"] = split
    if has_dist_token(student):
        metrics["acc1_fused"] = metrics["acc1"]
    return metrics


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
