"""Evaluation: top-1/top-5/loss with torchmetrics, per-head accuracy and
teacher agreement (the paper's Tables 3 and 4)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deitctl.factories import has_dist_token

if TYPE_CHECKING:
    from torchmetrics import Metric


def student_heads(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(fused logits, None), or for a student with a distillation token
    ((cls + dist) / 2, (cls, dist)) as timm's model fuses them."""
    if not has_dist_token(model):
        return model(images), None
    m: Any = model  # timm's VisionTransformerDistilled interface
    features = m.forward_features(images)
    cls, dist = m.head(m.head_drop(features[:, 0])), m.head_dist(m.head_drop(features[:, 1]))
    return (cls + dist) / 2, (cls, dist)


def _accuracy(num_classes: int, k: int, device: torch.device) -> Metric:
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro").to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    num_classes: int,
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    teacher: nn.Module | None = None,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``loader`` (targets are class indices), in percent: top-1,
    top-5; for a student with a distillation token each head alone and the paper's softmax
    fusion; with a teacher its top-1 and the share of images where student and teacher
    predict the same class (fused, and each head: the paper's Table 4). ``observe(logits,
    targets)`` sees each batch's fused logits (float) in loader order."""
    from torchmetrics import MeanMetric

    was_training = model.training
    model.eval()
    acc1, acc5 = _accuracy(num_classes, 1, device), _accuracy(num_classes, 5, device)
    loss = MeanMetric().to(device)
    extra: dict[str, Any] = {}
    distilled = has_dist_token(model)
    if distilled:
        extra = {k: _accuracy(num_classes, 1, device) for k in ("acc1_cls", "acc1_dist", "acc1_softmax_fusion")}
    if teacher is not None:
        extra["teacher_acc1"] = _accuracy(num_classes, 1, device)
        agreements = ("teacher_agreement", "teacher_agreement_cls", "teacher_agreement_dist")
        extra.update({k: MeanMetric().to(device) for k in agreements[: 3 if distilled else 1]})
    images = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits, heads = student_heads(model, x)
                t_logits = None
                if teacher is not None:
                    t_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                    t_logits = teacher(t_in).float()
            logits = logits.float()
            acc1.update(logits, y)
            acc5.update(logits, y)
            loss.update(F.cross_entropy(logits, y, reduction="none"))
            if observe is not None:
                observe(logits, y)
            if heads is not None:
                cls, dist = heads[0].float(), heads[1].float()
                extra["acc1_cls"].update(cls, y)
                extra["acc1_dist"].update(dist, y)
                extra["acc1_softmax_fusion"].update(cls.softmax(1) + dist.softmax(1), y)
            if t_logits is not None:
                t_class = t_logits.argmax(1)
                extra["teacher_acc1"].update(t_logits, y)
                extra["teacher_agreement"].update((t_class == logits.argmax(1)).float())
                if heads is not None:
                    extra["teacher_agreement_cls"].update((t_class == heads[0].argmax(1)).float())
                    extra["teacher_agreement_dist"].update((t_class == heads[1].argmax(1)).float())
            images += y.shape[0]
            if on_batch:
                on_batch(y.shape[0])
    finally:
        model.train(was_training)
    out = {"acc1": acc1.compute().item() * 100, "acc5": acc5.compute().item() * 100, "loss": loss.compute().item()}
    for key, metric in extra.items():
        out[key] = metric.compute().item() * 100
    from deitctl.distributed import all_reduce_sum

    out["images"] = int(all_reduce_sum([float(images)], device)[0])
    return out


class ClassScores:
    """The confusion matrix (rows: true class, columns: predicted) and per-class top-1."""

    def __init__(self, num_classes: int) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.metric = MulticlassConfusionMatrix(num_classes=num_classes)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.metric.update(logits.argmax(1).cpu(), targets.cpu())

    def matrix(self) -> torch.Tensor:
        return self.metric.compute()

    def per_class_acc1(self, classes: list[str]) -> dict[str, float | None]:
        """Each class's top-1 in percent (None: no image of that class)."""
        m = self.matrix()
        totals = m.sum(1)
        return {
            name: (float(m[i, i]) / float(totals[i]) * 100 if totals[i] else None) for i, name in enumerate(classes)
        }


class RealLabels:
    """Multi-label ground truth in the ImageNet-ReaL format: for each image, the list of
    acceptable class indices (empty: left out, as in the ReaL paper). Scores ReaL top-1 and
    top-5: a prediction is right when it is one of the image's labels."""

    def __init__(self, labels: list[list[int]]) -> None:
        self.labels, self.position = labels, 0
        self.counted, self.correct1, self.correct5 = 0, 0, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
        for predicted in top5:
            wanted = self.labels[self.position]
            self.position += 1
            if not wanted:
                continue
            self.counted += 1
            self.correct1 += predicted[0] in wanted
            self.correct5 += any(p in wanted for p in predicted)

    def result(self) -> dict[str, Any]:
        n = max(self.counted, 1)
        return {"real_acc1": self.correct1 / n * 100, "real_acc5": self.correct5 / n * 100, "real_images": self.counted}
