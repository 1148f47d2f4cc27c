"""Evaluation metrics against an independent computation on real images."""

from __future__ import annotations

import timm
import torch
from conftest import SAMPLE
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from deitctl.evaluation import evaluate


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    transform = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.25] * 3)])
    dataset = ImageFolder(str(SAMPLE / "val"), transform=transform)
    picks = list(range(0, len(dataset), len(dataset) // 40))[:40]
    images = torch.stack([dataset[i][0] for i in picks])
    return images, torch.tensor([dataset.targets[i] for i in picks])


def _evaluate(student_model: str):
    """A tiny student and teacher on 40 real images: (student, teacher, images, targets, metrics)."""
    torch.manual_seed(0)
    student = timm.create_model(
        student_model, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10
    ).eval()
    teacher = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).eval()
    images, targets = _batches()
    loader = DataLoader(TensorDataset(images, targets), batch_size=16)
    metrics = evaluate(student, loader, num_classes=10, device=torch.device("cpu"), teacher=teacher)
    return student, teacher, images, targets, metrics


def test_each_heads_agreement_with_the_teacher_is_reported():
    student, teacher, images, targets, metrics = _evaluate("deit_tiny_distilled_patch16_224")

    with torch.no_grad():
        tokens = student.forward_features(images)
        cls, dist = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
        taught = teacher(images).argmax(1)
    expected = {
        "teacher_agreement": (taught == ((cls + dist) / 2).argmax(1)).float().mean().item() * 100,
        "teacher_agreement_cls": (taught == cls.argmax(1)).float().mean().item() * 100,
        "teacher_agreement_dist": (taught == dist.argmax(1)).float().mean().item() * 100,
        "acc1_cls": (targets == cls.argmax(1)).float().mean().item() * 100,
    }
    for key, value in expected.items():
        assert abs(metrics[key] - value) < 1e-4, (key, metrics[key], value)
    assert metrics["images"] == 40


def test_a_student_without_a_distillation_token_has_no_head_agreements():
    *_, metrics = _evaluate("deit_tiny_patch16_224")
    assert "teacher_agreement" in metrics
    assert "teacher_agreement_cls" not in metrics and "teacher_agreement_dist" not in metrics
