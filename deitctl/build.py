"""Assemble a run's parts from a recipe through the plugin registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deitctl.errors import DeitctlError, PluginError, RecipeError
from deitctl.recipe import Recipe
from deitctl.registry import SINGULAR, Plugin, get_registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def call_factory(plugin: Plugin, context: dict[str, Any], options: dict[str, Any], recipe: Recipe, section: str):
    """Call a plugin factory with the context it asks for and the recipe's options."""
    params, _ = plugin.options()
    kwargs = {k: v for k, v in context.items() if k in params}
    kwargs.update(options)
    try:
        return plugin.factory(**kwargs)
    except DeitctlError:
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
        return plugin.factory(**{k: v for k, v in context.items() if k in plugin.options()[0]}, **recipe.data.options)
    except FileNotFoundError as exc:
        raise RecipeError(
            f"{exc.args[0] if exc.args else exc} (split {split!r} of dataset {recipe.data.dataset!r})",
            source=recipe.source,
            key="data.root",
        ) from None
    except DeitctlError:
        raise
    except Exception as exc:
        raise RecipeError(
            f"dataset plugin {plugin.name!r} ({plugin.provider}) failed on split {split!r}: {type(exc).__name__}: {exc}",
            source=recipe.source,
            key="data",
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
