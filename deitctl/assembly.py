"""Assembly: a recipe's parts, each built once through the plugin registry.

The order follows what each part needs. The data comes first: the training split gives the
class list. Then the student (its input normalisation), the strategy (checked against the
student), the teacher, and the augmentation, whose transforms the datasets take from then
on (:class:`LateTransform`). Last, the loaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deitctl.api import Augmentation, Strategy
from deitctl.data import Loader, base_and_indices, make_loader, per_class_subset
from deitctl.distributed import World
from deitctl.errors import DeitctlError, PluginError, RecipeError
from deitctl.image_cache import cache_decoded
from deitctl.kinds import kind
from deitctl.recipe import Recipe
from deitctl.registry import Plugin, get_registry
from deitctl.runtime import resolve_device
from deitctl.teacher import FrozenTeacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_NUM_CLASSES = 1000  # a dataset that names no classes, with no [data] num_classes

Stats = tuple[float, ...]


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- plugin factories


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


def build_datasets(
    recipe: Recipe, train_transform: Callable[[Any], Any] | None, val_transform: Callable[[Any], Any] | None
) -> tuple[Any, Any, list[str]]:
    """(train, val, classes): the validation split renumbered to the training split's classes."""
    d = recipe.data
    train = build_dataset(recipe, d.train_split, train_transform)
    val = build_dataset(recipe, d.val_split, val_transform)
    classes = class_list(recipe, train)
    unknown = align_classes(val, classes)
    if unknown:
        raise RecipeError(
            f"the {d.val_split!r} split has classes that {d.train_split!r} has not: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}",
            source=recipe.source,
            key="data.val_split",
        )
    return per_class_subset(train, d.train_per_class), per_class_subset(val, d.val_per_class), classes


def _decode_threads(recipe: Recipe) -> int:
    """Threads that fill the image cache: as many as the loader has workers, within the CPU count."""
    return max(1, min(recipe.data.num_workers, os.cpu_count() or 1))


# --------------------------------------------------------------------------- the whole


def assemble(recipe: Recipe, *, world: World | None = None, with_teacher: bool | None = None) -> Parts:
    """Build a run's data, models, augmentation, loss and loaders from its recipe."""
    from deitctl.finetune import init_student
    from deitctl.weights import is_remote, teacher_source

    world = world or World()
    device = resolve_device(recipe)
    train_tf, val_tf = LateTransform(), LateTransform()
    train_ds, val_ds, classes = build_datasets(recipe, train_tf, val_tf)
    num_classes = len(classes)

    student = build_student(recipe, num_classes)
    checkpoint = recipe.student.checkpoint
    notes = (
        [f"student initialised from {checkpoint}: {n}" for n in init_student(student, checkpoint, recipe)]
        if checkpoint
        else []
    )
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
    if len(train_ds) < d.batch_size * world.world_size:
        raise RecipeError(
            f"the training split has {len(train_ds)} images, fewer than one batch "
            f"({d.batch_size} x {world.world_size} processes)",
            source=recipe.source,
            key="data.batch_size",
        )
    for split, ds in ((d.train_split, train_ds), (d.val_split, val_ds)):
        if note := cache_decoded(ds, limit_mb=d.cache_mb, threads=_decode_threads(recipe)):
            notes.append(f"{split} split: {note}")
    common: dict[str, Any] = dict(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and device.type == "cuda",
        num_replicas=world.world_size,
        rank=world.rank,
        seed=recipe.run.seed,
        bad_images=d.bad_images,
        worker_nice=d.worker_nice,
        device=device,
    )
    train_loader = make_loader(train_ds, batch_size=d.batch_size, train=True, repeats=d.repeated_aug, **common)
    val_loader = make_loader(val_ds, batch_size=d.batch_size, train=False, **common)
    return Parts(recipe, device, classes, mean, std, student, strategy, aug, train_loader, val_loader, teacher, notes)
