"""What plugins build on: the objects augmentation, strategy and logger factories return.

Plugins import from here and from :mod:`deitctl` only; the engine never
imports plugins directly (it goes through the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from deitctl.hookspecs import Register
from deitctl.images import IMAGE_EXTENSIONS, MAX_SIDE, load_rgb

__all__ = ["Augmentation", "Criterion", "Outputs", "Register", "Strategy", "as_tuple", "make_mixup", "open_shards"]

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_SIDE",
    "Augmentation",
    "Register",
    "Strategy",
    "as_tuple",
    "load_rgb",
    "make_mixup",
    "open_shards",
]

Criterion = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
Outputs: TypeAlias = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"
"""A student's training outputs: logits, or (class, distillation) logits with a distillation token."""


@dataclass
class Augmentation:
    """Transforms for one recipe.

    ``batch_transform(images, targets) -> (images, soft_targets)`` runs on the
    device on every training batch (timm's Mixup/CutMix); with it, targets
    become soft and the label smoothing is its own. Without it, ``smoothing``
    is applied by the loss.
    """

    train_transform: Callable[[Any], Any]
    eval_transform: Callable[[Any], Any]
    batch_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None
    smoothing: float = 0.0


class Strategy:
    """A distillation strategy: the training loss.

    ``outputs`` is the student's logits, or ``(class_logits, dist_logits)``
    for a student trained with a distillation token (``uses_dist_token``).
    ``targets`` are class indices or soft targets (after Mixup/CutMix);
    ``base_criterion(logits, targets)`` is the label loss (with smoothing or
    soft targets); ``teacher_logits`` is ``None`` unless ``uses_teacher``.
    """

    uses_teacher: bool = True
    uses_dist_token: bool = False

    def __call__(
        self,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        base_criterion: Criterion,
    ) -> torch.Tensor:
        raise NotImplementedError


class Logger:
    """A tracker that receives a run's figures (a logger plugin's factory returns one).

    Every method is optional (the defaults do nothing) and runs on the main process only,
    in this order: ``log_hparams`` once, then ``log_step`` and ``log_epoch`` as training
    goes, ``log_final`` when the run has finished all its epochs, and ``close`` always
    (also after a failure or a stop). Metric values are floats.
    """

    def log_hparams(self, params: dict[str, Any]) -> None:
        """The resolved recipe, flat: ``{"optimizer.lr": 0.0005, "optimizer.betas": "[0.9, 0.999]", ...}``
        (booleans, numbers and strings; lists as JSON text)."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``[run] log_every`` optimizer updates; ``step`` counts the updates so far.
        ``metrics``: ``train_loss`` (mean since the last call, over the main process's batches),
        ``lr``, ``images_per_s``
        (all processes), and ``scale`` (the fp16 loss scale) with fp16."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After each epoch (``epoch`` counts from 1): the numbers of its ``metrics.jsonl`` line
        (``train_loss``, ``lr``, ``acc1``, ``acc5``, ``acc1_cls``, ``acc1_dist``,
        ``teacher_agreement``, ``best_acc1``, ...)."""

    def log_final(self, metrics: dict[str, float]) -> None:
        """The results of a finished run: the last epoch's metrics, ``best_acc1`` and ``epochs``."""

    def close(self) -> None:
        """Flush and release; the last call."""


def make_mixup(
    *,
    mixup: float,
    cutmix: float,
    prob: float,
    switch_prob: float,
    mode: str,
    smoothing: float,
    num_classes: int,
) -> Callable[[Any, Any], tuple[Any, Any]] | None:
    """timm's Mixup/CutMix, or ``None`` when both are off."""
    if (mixup <= 0 and cutmix <= 0) or prob <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=smoothing,
        num_classes=num_classes,
    )


def as_tuple(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def open_shards(
    *,
    root: str,
    split: str,
    transform: Callable[[Any], Any] | None = None,
    stream: bool = False,
    shuffle_buffer: int = 1000,
) -> Any:
    """A split of the shards ``deitctl data pack`` wrote into ``root``: local shards are read
    by index (exactly as the ImageFolder they were packed from); shards behind a URL (http,
    https, pipe:, ... as the webdataset package opens them), or local ones with ``stream``,
    are streamed, mixed by a shuffle buffer of ``shuffle_buffer`` images per loader worker."""
    from deitctl.shards import open_split

    return open_split(root, split, transform, stream=stream, shuffle_buffer=shuffle_buffer)
