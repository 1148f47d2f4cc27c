"""Assemble a run's parts from a recipe through the plugin registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deitctl.errors import DeitctlError, PluginError, RecipeError
from deitctl.recipe import Recipe
from deitctl.registry import SINGULAR, Plugin, get_registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def call_factory(plugin: Plugin, context: dict[str, Any], options: dict[str, Any], recipe: Recipe, section: str,
                 passthrough: tuple[type[BaseException], ...] = ()):
    """Call a plugin factory with the context it asks for and the recipe's options;
    its errors become one message naming the plugin, its provider and the section."""
    params, _ = plugin.options()
    kwargs = {k: v for k, v in context.items() if k in params}
    kwargs.update(options)
    try:
        return plugin.factory(**kwargs)
    except (DeitctlError, *passthrough):
        raise
    except Exception as exc:
        raise RecipeError(
            f"{SINGULAR[plugin.kind]} plugin {plugin.name!r} ({plugin.provider}) failed: "
            f"{type(exc).__name__}: {exc}",
            source=recipe.source,
            key=section,
        ) from None


def build_strategy(recipe: Recipe):
    plugin = get_registry().get("strategies", recipe.distillation.strategy)
    strategy = call_factory(plugin, {}, recipe.distillation.options, recipe, "distillation")
    if not callable(strategy):
        raise PluginError(f"strategy plugin {plugin.name!r} ({plugin.provider}) did not return a callable loss")
    return strategy


def has_dist_token(model: Any) -> bool:
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def build_student(recipe: Recipe, num_classes: int):
    """The student module, checked against the strategy."""
    import torch

    plugin = get_registry().get("students", recipe.student.plugin)
    context = {"num_classes": num_classes, "img_size": recipe.data.img_size}
    model = call_factory(plugin, context, recipe.student.options, recipe, "student")
    if not isinstance(model, torch.nn.Module):
        raise PluginError(
            f"student plugin {plugin.name!r} ({plugin.provider}) returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def check_student_strategy(recipe: Recipe, student: Any, strategy: Any) -> None:
    name = recipe.student.options.get("model", recipe.student.plugin)
    wants_token = getattr(strategy, "uses_dist_token", False)
    if wants_token and not has_dist_token(student):
        raise RecipeError(
            f"strategy {recipe.distillation.strategy!r} needs a student with a distillation token, "
            f"and {name!r} has none (use e.g. model = \"deit_small_distilled_patch16_224\")",
            source=recipe.source,
            key="distillation.strategy",
        )
    if has_dist_token(student) and not wants_token:
        raise RecipeError(
            f"{name!r} has a distillation token, which strategy {recipe.distillation.strategy!r} does not train; "
            "use strategy = \"token\" or a student without one (e.g. deit_small_patch16_224)",
            source=recipe.source,
            key="student.model",
        )


def normalization(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A timm model's input mean and std (ImageNet's by default)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(map(float, mean)), tuple(map(float, std))


def build_augmentation(recipe: Recipe, mean, std, num_classes: int):
    from deitctl.api import Augmentation

    plugin = get_registry().get("augmentations", recipe.augmentation.plugin)
    context = {"img_size": recipe.data.img_size, "mean": list(mean), "std": list(std), "num_classes": num_classes}
    aug = call_factory(plugin, context, recipe.augmentation.options, recipe, "augmentation")
    if not isinstance(aug, Augmentation):
        raise PluginError(
            f"augmentation plugin {plugin.name!r} ({plugin.provider}) returned {type(aug).__name__}, "
            "not a deitctl.api.Augmentation"
        )
    if aug.batch_transform is not None and recipe.data.batch_size % 2:
        raise RecipeError(
            f"batch_size must be even when Mixup/CutMix is on (got {recipe.data.batch_size})",
            source=recipe.source,
            key="data.batch_size",
        )
    return aug


def build_dataset(recipe: Recipe, split: str, transform, num_classes: int = 0):
    plugin = get_registry().get("datasets", recipe.data.dataset)
    context = {
        "root": recipe.data.root,
        "split": split,
        "transform": transform,
        "num_classes": num_classes or recipe.data.num_classes,
        "img_size": recipe.data.img_size,
    }
    try:
        return call_factory(plugin, context, recipe.data.options, recipe, "data", passthrough=(FileNotFoundError,))
    except FileNotFoundError as exc:
        raise RecipeError(
            f"{exc.args[0] if exc.args else exc} (split {split!r} of dataset {recipe.data.dataset!r})",
            source=recipe.source,
            key="data.root",
        ) from None


@dataclass
class TeacherSpec:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int


def build_teacher(recipe: Recipe, num_classes: int, student_mean, student_std, *, load: bool = True):
    """The frozen teacher, wrapped to re-normalise and resize the student's batch."""
    import torch

    from deitctl.checkpoint import load_weights
    from deitctl.teacher import FrozenTeacher

    t = recipe.teacher
    assert t is not None
    plugin = get_registry().get("teachers", t.plugin)
    model = call_factory(plugin, {"num_classes": num_classes}, t.options, recipe, "teacher")
    if not isinstance(model, torch.nn.Module):
        raise PluginError(
            f"teacher plugin {plugin.name!r} ({plugin.provider}) returned {type(model).__name__}, not a torch.nn.Module"
        )
    if load and t.checkpoint:
        load_weights(model, t.checkpoint, what=f"teacher ({t.plugin} {t.options.get('model', '')})".strip())
    mean, std = normalization(model)
    if not getattr(model, "pretrained_cfg", None):
        mean, std = student_mean, student_std
    mean = tuple(t.mean) if t.mean else mean
    std = tuple(t.std) if t.std else std
    return FrozenTeacher(model, student_mean, student_std, mean, std, t.input_size)


HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
DIST_KEYS = ("dist_token",)


def init_student(model: Any, path: str, recipe: Recipe) -> list[str]:
    """Initialise a student from a checkpoint (fine-tuning, transfer): the
    position embedding is resampled (bicubic) to the student's patch grid,
    class and distillation tokens are kept, and heads whose class count
    differs are dropped and left freshly initialised. Returns notes."""
    import torch

    from deitctl.checkpoint import extract_state_dict, load_file

    if not path or not __import__("pathlib").Path(path).is_file():
        raise RecipeError(f"no such file {path!r}", source=recipe.source, key="student.checkpoint")
    state = dict(extract_state_dict(load_file(path), path))
    own = model.state_dict()
    notes: list[str] = []
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = int(getattr(model, "num_prefix_tokens", 1))
        old_prefix = 1 + sum(k in state for k in DIST_KEYS) if "cls_token" in state else 0
        pos = state["pos_embed"]
        if old_prefix != prefix:  # a distillation token added or dropped: its position row too
            rows = [pos[:, :1]] * prefix if old_prefix else []
            pos = torch.cat([*rows, pos[:, old_prefix:]], dim=1) if old_prefix else pos
        grid = tuple(model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(grid), num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
        )
        notes.append(f"position embedding resampled to a {grid[0]}x{grid[1]} grid")
    if "patch_embed.proj.weight" in state and "patch_embed.proj.weight" in own \
            and state["patch_embed.proj.weight"].shape != own["patch_embed.proj.weight"].shape:
        from timm.layers import resample_patch_embed

        state["patch_embed.proj.weight"] = resample_patch_embed(
            state["patch_embed.proj.weight"], list(own["patch_embed.proj.weight"].shape[-2:]))
        notes.append("patch embedding resampled")
    dropped = [k for k in state if k.startswith(HEAD_PREFIXES) and (k not in own or state[k].shape != own[k].shape)]
    for key in dropped:
        del state[key]
    if dropped:
        notes.append(f"classifier heads re-initialised for {len(_classes_of(own))} classes ({', '.join(sorted({k.split('.')[0] for k in dropped}))})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = [k for k in missing if k.startswith(HEAD_PREFIXES) or k in DIST_KEYS]
    if "dist_token" in missing and "cls_token" in state:
        with torch.no_grad():
            model.dist_token.copy_(state["cls_token"])
        notes.append("distillation token initialised from the class token")
    unexpected = [k for k in unexpected if k not in DIST_KEYS]
    bad = [k for k in missing if k not in allowed_missing]
    if bad or unexpected:
        raise RecipeError(
            f"{path} does not fit the student: missing {bad[:5]}, unexpected {unexpected[:5]}",
            source=recipe.source, key="student.checkpoint")
    if any(k in state for k in DIST_KEYS) and "dist_token" not in own:
        notes.append("distillation token dropped (the student has none)")
    return notes


def _classes_of(state: dict[str, Any]) -> list[int]:
    for key in ("head.bias", "fc.bias", "classifier.bias"):
        if key in state:
            return list(range(state[key].shape[0]))
    return []
