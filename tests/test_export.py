"""``deitctl export``: a tiny real run's student loaded back by plain timm, onnxruntime and
safetensors, against the fused logits ``deitctl eval`` scores."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import HOSTILE, SAMPLE, cli

from deitctl.evaluation import student_heads
from deitctl.inference import load_student

TINY = HOSTILE / "tiny.toml"
TIMM_KWARGS = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A distilled tiny DeiT (with EMA) trained for one epoch on real CIFAR-10 images."""
    out = tmp_path_factory.mktemp("export") / "run"
    sets = [
        f"data.root={json.dumps(str(SAMPLE))}",
        'student.model="deit_tiny_distilled_patch16_224"',
        'distillation.strategy="token"',
        'teacher.model="resnet18"',
        "teacher.channels=[8, 16, 32, 64]",
        "ema.enabled=true",
        "ema.decay=0.5",
    ]
    code, text = cli("train", str(TINY), "--output-dir", str(out), *[a for s in sets for a in ("--set", s)])
    assert code == 0, text
    return out


def _val(ckpt: Path, *, evaluated_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real validation images through the run's own eval transform: a dozen, or exactly
    the ones `deitctl eval` scores (the recipe's val_per_class)."""
    from torchvision.datasets import ImageFolder

    from deitctl.data import per_class_subset
    from deitctl.factories import build_augmentation

    recipe, _, classes, mean, std = load_student(ckpt)
    transform = build_augmentation(recipe, mean, std, len(classes)).eval_transform
    dataset = ImageFolder(str(SAMPLE / "val"), transform=transform)
    if evaluated_only:
        subset = per_class_subset(dataset, recipe.data.val_per_class)
        picks = [subset.indices[i] for i in range(len(subset))]
    else:
        picks = list(range(0, len(dataset), len(dataset) // 12))
    return torch.stack([dataset[i][0] for i in picks]), torch.tensor([dataset.targets[i] for i in picks])


def _fused(ckpt: Path, images: torch.Tensor, ema: bool = False) -> torch.Tensor:
    _, student, *_ = load_student(ckpt, ema=ema)
    with torch.no_grad():
        return student_heads(student.eval(), images)[0]


def test_timm_export_loads_in_plain_timm_and_gives_the_fused_logits(run, tmp_path):
    import timm

    file = tmp_path / "student.safetensors"
    code, text = cli("export", "--ckpt", str(run / "best.pt"), "--format", "timm", "--output", str(file), "--json")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["max_abs_diff"] == 0.0
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        **TIMM_KWARGS,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(file), num_classes=10),
    ).eval()
    images, _ = _val(run / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(images), _fused(run / "best.pt", images), rtol=0, atol=0)
    # and the top-1 of `deitctl eval` on the validation split
    code, text = cli("eval", "--ckpt", str(run / "best.pt"), "--json")
    assert code == 0, text
    images, targets = _val(run / "best.pt", evaluated_only=True)
    with torch.no_grad():
        top1 = (model(images).argmax(1) == targets).float().mean().item() * 100
    assert top1 == pytest.approx(json.loads(text.strip().splitlines()[-1])["acc1"], abs=1e-4)


def test_onnx_export_has_metadata_a_dynamic_batch_and_matches_pytorch(run, tmp_path):
    import onnx
    import onnxruntime

    file = tmp_path / "student.onnx"
    code, text = cli("export", "--ckpt", str(run / "best.pt"), "--format", "onnx", "--output", str(file), "--json")
    assert code == 0, text
    report = json.loads(text.strip().splitlines()[-1])
    assert report["max_abs_diff"] <= 1e-4 and report["checked_with"] == "onnxruntime"
    model = onnx.load(str(file))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == sorted(p.name for p in (SAMPLE / "val").iterdir())
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert json.loads(meta["image_size"]) == 32
    assert tomllib.loads(meta["recipe"])["distillation"]["strategy"] == "token"
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic
    images, _ = _val(run / "best.pt")
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    for n in (1, len(images)):
        (got,) = session.run(["logits"], {"images": images[:n].numpy()})
        torch.testing.assert_close(torch.from_numpy(got), _fused(run / "best.pt", images[:n]), rtol=0, atol=1e-4)


def test_safetensors_export_with_its_sidecar_and_the_ema_weights(run, tmp_path):
    from safetensors.torch import load_file

    file = tmp_path / "weights" / "student.safetensors"
    code, text = cli(
        "export", "--ckpt", str(run / "last.pt"), "--format", "safetensors", "--output", str(file), "--ema"
    )
    assert code == 0, text
    state = load_file(str(file))
    saved = torch.load(run / "last.pt", weights_only=True)
    assert state.keys() == saved["model_ema"].keys()
    for key, value in saved["model_ema"].items():
        assert torch.equal(state[key], value), key
    assert any(not torch.equal(saved["model"][k], saved["model_ema"][k]) for k in state)  # EMA, not the model
    sidecar = json.loads((tmp_path / "weights" / "student.json").read_text())
    assert sidecar["classes"] == saved["classes"] and sidecar["num_classes"] == 10
    assert sidecar["mean"] == saved["normalization"]["mean"] and sidecar["image_size"] == 32
    assert sidecar["weights"] == "model_ema" and sidecar["student"]["model"] == "deit_tiny_distilled_patch16_224"
    assert tomllib.loads(sidecar["recipe"]) == tomllib.loads(saved["recipe"])


def test_export_refuses_an_unknown_format_and_a_foreign_checkpoint(run, tmp_path):
    code, text = cli("export", "--ckpt", str(run / "best.pt"), "--format", "tflite", "--output", str(tmp_path / "x"))
    assert code == 2 and "--format" in text and "tflite" in text
    foreign = tmp_path / "plain.pt"
    torch.save({"head.weight": torch.zeros(2, 2)}, foreign)
    code, text = cli("export", "--ckpt", str(foreign), "--format", "onnx", "--output", str(tmp_path / "x.onnx"))
    assert code == 2 and f"{foreign}: not a deitctl checkpoint" in " ".join(text.split())
    code, text = cli("export", "--ckpt", str(run / "best.pt"), "--format", "timm", "--output", str(tmp_path / "x.pt"))
    assert code == 2 and "ends in .safetensors" in text
    assert not list(tmp_path.glob("x*"))
