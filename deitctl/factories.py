"""Plugin factories, called through the registry: each kind's object built from its recipe
section, checked for what deitctl needs of it (a module, the right logits, an
:class:`~deitctl.api.Augmentation`), with one message naming the plugin and its provider
when it fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deitctl.api import Augmentation, Strategy
from deitctl.errors import DeitctlError, PluginError, RecipeError
from deitctl.kinds import kind
from deitctl.recipe import Recipe
from deitctl.registry import Plugin, get_registry
from deitctl.rng import kept_rng
from deitctl.teacher import FrozenTeacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stats = tuple[float, ...]


def call_factory(
    plugin: Plugin,
    context: dict[str, Any],
    options: dict[str, Any],
    recipe: Recipe,
    section: str,
    passthrough: tuple[type[BaseException], ...] = (),
) -> Any:
    """Call a plugin factory with the context it asks for and the recipe's options;
    its errors become one message naming the plugin, its provider and the section."""
    params, _ = plugin.options()
    kwargs = {k: v for k, v in context.items() if k in params}
    kwargs.update(options)
    try:
        return plugin.factory(**kwargs)
    except DeitctlError:
        raise
    except passthrough:
        raise
    except Exception as exc:
        raise RecipeError(
            f"{kind(plugin.kind).singular} plugin {plugin.name!r} ({plugin.provider}) failed: "
            f"{type(exc).__name__}: {exc}",
            source=recipe.source,
            key=section,
        ) from exc


def _module(plugin: Plugin, obj: Any) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise PluginError(
            f"{kind(plugin.kind).singular} plugin {plugin.name!r} ({plugin.provider}) returned "
            f"{type(obj).__name__}, not a torch.nn.Module"
        )
    return obj


def build_strategy(recipe: Recipe) -> Strategy:
    plugin = get_registry().get("strategies", recipe.distillation.strategy)
    strategy = call_factory(plugin, {}, recipe.distillation.options, recipe, "distillation")
    if not callable(strategy):
        raise PluginError(f"strategy plugin {plugin.name!r} ({plugin.provider}) did not return a callable loss")
    return strategy


def has_dist_token(model: Any) -> bool:
    """A student with timm's distillation-token interface."""
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def build_student(recipe: Recipe, num_classes: int) -> nn.Module:
    plugin = get_registry().get("students", recipe.student.plugin)
    context = {"num_classes": num_classes, "img_size": recipe.data.img_size}
    return _module(plugin, call_factory(plugin, context, recipe.student.options, recipe, "student"))


def check_student_strategy(recipe: Recipe, student: nn.Module, strategy: Strategy) -> None:
    name = recipe.student.options.get("model", recipe.student.plugin)
    wants_token = getattr(strategy, "uses_dist_token", False)
    if wants_token and not has_dist_token(student):
        raise RecipeError(
            f"strategy {recipe.distillation.strategy!r} needs a student with a distillation token, "
            f'and {name!r} has none (use e.g. model = "deit_small_distilled_patch16_224")',
            source=recipe.source,
            key="distillation.strategy",
        )
    if has_dist_token(student) and not wants_token:
        raise RecipeError(
            f"{name!r} has a distillation token, which strategy {recipe.distillation.strategy!r} does not train; "
            'use strategy = "token" or a student without one (e.g. deit_small_patch16_224)',
            source=recipe.source,
            key="student.model",
        )


def normalization(model: nn.Module) -> tuple[Stats, Stats]:
    """A timm model's input mean and std (ImageNet's by default)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(map(float, mean)), tuple(map(float, std))


def build_augmentation(recipe: Recipe, mean: Stats, std: Stats, num_classes: int) -> Augmentation:
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


def build_dataset(
    recipe: Recipe, split: str, transform: Callable[[Any], Any] | None, *, num_classes: int = 0
) -> Dataset[Any]:
    """One split from the recipe's dataset plugin; a missing one names ``data.root``.
    ``num_classes``: the class count when it is known already (a checkpoint's)."""
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
        ) from exc


def build_teacher(
    recipe: Recipe, num_classes: int, student_mean: Stats, student_std: Stats, *, load: bool = True
) -> FrozenTeacher:
    """The frozen teacher, wrapped to re-normalise and resize the student's batch."""
    from deitctl.weights import load_into, teacher_source

    t = recipe.teacher
    assert t is not None
    plugin = get_registry().get("teachers", t.plugin)
    # the teacher's random initialisation (replaced by its weights) draws from the global
    # generators: building it or not leaves them where they were, so that a run with a
    # teacher-output cache draws the same drop-path masks as one with the live teacher
    with kept_rng():
        model = _module(plugin, call_factory(plugin, {"num_classes": num_classes}, t.options, recipe, "teacher"))
    source = teacher_source(t)
    if load and source:
        load_into(model, source, what=f"teacher ({t.plugin} {t.options.get('model', '')})".strip())
    mean, std = normalization(model)
    if not getattr(model, "pretrained_cfg", None):
        mean, std = student_mean, student_std
    mean = tuple(t.mean) if t.mean else mean
    std = tuple(t.std) if t.std else std
    return FrozenTeacher(model, student_mean, student_std, mean, std, t.input_size)


def check_output(recipe: Recipe, module: nn.Module, num_classes: int, section: str) -> None:
    """A dummy batch through a student or teacher: logits of shape (2, num_classes)?"""
    size = recipe.data.img_size
    plugin = getattr(recipe, section).plugin
    was_training = module.training
    module.eval()
    with torch.no_grad():
        try:
            out = module(torch.zeros(2, 3, size, size))
        except Exception as exc:
            raise RecipeError(
                f"{section} plugin {plugin!r} failed on a [2, 3, {size}, {size}] batch: {type(exc).__name__}: {exc}",
                source=recipe.source,
                key=section,
            ) from exc
        finally:
            module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(
            f"the {section} ({plugin!r}) returned {shape} for a batch of 2 images; expected logits of shape "
            f"[2, {num_classes}] ({num_classes} classes in the data)",
            source=recipe.source,
            key=section,
        )
