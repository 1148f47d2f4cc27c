"""The hook specifications: one hook per plugin kind.

Every hook is called with a ``register`` callable,
``register(name, factory, *, help="")``. A plugin module implements any of
them with :data:`deitctl.hookimpl` and is found through the ``deitctl``
entry-point group (the built-in plugins are registered the same way).
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("deitctl")

Register = Callable[..., None]


@hookspec
def register_teachers(register: Register) -> None:
    """Register teacher factories.

    ``factory(*, num_classes: int, **options) -> torch.nn.Module``: the module
    maps a normalised image batch ``[B, 3, H, W]`` to logits ``[B, num_classes]``.
    ``options`` are the recipe's ``[teacher]`` keys except ``plugin``,
    ``checkpoint``, ``mean``, ``std``, ``input_size`` and ``recipe``, which
    deitctl handles for every teacher (it loads the checkpoint, freezes the
    module, puts it in eval mode and runs it without gradients).
    """


@hookspec
def register_students(register: Register) -> None:
    """Register student factories.

    ``factory(*, num_classes: int, img_size: int, **options) -> torch.nn.Module``
    (``num_classes`` and ``img_size`` are passed when the factory names them).
    A student with a distillation token has the interface of timm's
    ``VisionTransformerDistilled``: ``set_distilled_training(bool)`` (training
    forward returns ``(class_logits, dist_logits)``), ``forward_features``
    (tokens, class token first and distillation token second), ``head``,
    ``head_dist`` and ``head_drop``; in eval mode its forward fuses the heads.
    """


@hookspec
def register_augmentations(register: Register) -> None:
    """Register augmentation factories.

    ``factory(*, img_size: int, mean, std, num_classes: int, **options)
    -> deitctl.api.Augmentation`` (train and eval transforms, an optional batch
    transform such as Mixup/CutMix, and the label smoothing).
    """


@hookspec
def register_strategies(register: Register) -> None:
    """Register distillation strategies.

    ``factory(**options) -> deitctl.api.Strategy``: a loss on the student's
    outputs, the targets and the teacher's logits.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset factories.

    ``factory(*, split: str, transform, **options) -> torch.utils.data.Dataset``
    yielding ``(image, target)``; the dataset has a ``classes`` list.
    """
