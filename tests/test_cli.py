"""The command line as a user meets it, and checkpoint loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, runner

import deitctl
from deitctl.cli import app


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"deitctl {deitctl.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "predict", "plugins", "recipe"):
        assert command in result.output


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "deitctl", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"deitctl {deitctl.__version__}"


def test_plugins_json_lists_builtins_with_provider():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)["plugins"]
    found = {(r["kind"], r["name"]) for r in rows}
    expected = {
        ("teacher", "timm"),
        ("student", "deit"),
        ("student", "timm"),
        ("augmentation", "deit"),
        ("augmentation", "three_augment"),
        ("augmentation", "simple"),
        ("strategy", "none"),
        ("strategy", "soft"),
        ("strategy", "hard"),
        ("strategy", "token"),
        ("dataset", "imagefolder"),
        ("dataset", "synthetic"),
    }
    assert expected <= found
    assert all(
        r["provider"] == f"deitctl {deitctl.__version__}" and r["help"]
        for r in rows
        if (r["kind"], r["name"]) in expected
    )


def test_plugins_table():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0 and "imagefolder" in result.output and "token" in result.output


def test_usage_error_is_exit_2():
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2


# ------------------------------------------------------------------ checkpoints


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker))}, evil)
    result = runner.invoke(app, ["eval", "--ckpt", str(evil), "--json"])
    assert result.exit_code == 2
    assert str(evil) in result.output and "refused" in result.output and "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_ema", "module_prefix", "safetensors"])
def test_teacher_checkpoint_layouts(layout, tmp_path):
    """Official DeiT ({"model": ...}), timm ({"state_dict": ...}), EMA, DDP prefixes, safetensors."""
    import timm

    from deitctl.factories import build_teacher
    from deitctl.recipe import check_plugins, recipe_from_dict

    source = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64])
    state = source.state_dict()
    path = tmp_path / ("t.safetensors" if layout == "safetensors" else "t.pth")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        payload = {
            "plain": state,
            "model": {"model": state, "epoch": 3},
            "state_dict": {"state_dict": state, "arch": "resnet18"},
            "model_ema": {"model_ema": state},
            "module_prefix": {"model": {f"module.{k}": v for k, v in state.items()}},
        }[layout]
        torch.save(payload, path)
    recipe = recipe_from_dict(
        {
            "student": {"plugin": "deit", "model": "deit_tiny_patch16_224", "patch_size": 8, "depth": 1},
            "teacher": {"plugin": "timm", "model": "resnet18", "channels": [8, 16, 32, 64], "checkpoint": str(path)},
            "distillation": {"strategy": "hard"},
            "data": {"img_size": 32, "num_classes": 10},
        },
        "t.toml",
    )
    check_plugins(recipe)
    teacher = build_teacher(recipe, 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for key, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    x = torch.randn(2, 3, 32, 32)
    source.eval()
    torch.testing.assert_close(teacher(x), source(x))


def test_teacher_renormalises_and_resizes():
    from deitctl.teacher import FrozenTeacher

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    teacher = FrozenTeacher(
        Probe(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), input_size=16
    )
    x = torch.full((1, 3, 8, 8), 2.0)  # student-normalised: raw pixel 0.5 + 2 * 0.25 = 1.0
    teacher(x)
    assert seen["x"].shape == (1, 3, 16, 16)
    torch.testing.assert_close(seen["x"], torch.ones(1, 3, 16, 16))


def test_eval_official_deit_checkpoint_with_model_and_data(tmp_path):
    """Weights in the official DeiT layout ({"model": state_dict}) need --model and --data."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1)
    path = tmp_path / "deit_tiny_distilled.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, path)
    sample = ROOT / "data" / "cifar10-sample"
    args = [
        "eval",
        "--ckpt",
        str(path),
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--data",
        str(sample),
        "--set",
        "data.val_per_class=2",
        "--set",
        "data.num_workers=0",
        "--set",
        "student.depth=1",
        "--set",
        f"run.threads={torch.get_num_threads() + 1}",  # a count the process does not have yet
        "--json",
    ]
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, args)
        assert torch.get_num_threads() == threads + 1  # eval applies the recipe's run.threads too
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 20 and {"acc1", "acc5", "loss", "acc1_cls", "acc1_dist"} <= metrics.keys()
    result = runner.invoke(app, ["eval", "--ckpt", str(path), "--json"])
    assert result.exit_code == 2 and "--model" in result.output


def test_a_misspelt_hook_is_reported_not_ignored(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(
        "import deitctl\n\n@deitctl.hookimpl\ndef register_teacher(register):\n"
        "    register('typo', lambda *, num_classes: None)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "DEITCTL_PLUGINS": "typo_plugin"}
    proc = subprocess.run(
        [sys.executable, "-m", "deitctl", "plugins", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["failures"] == [
        {
            "provider": "typo_plugin",
            "error": "unknown hook 'register_teacher' (did you mean 'register_teachers'?); deitctl's hooks: "
            "register_teachers, register_students, register_augmentations, register_strategies, register_datasets, "
            "register_loggers",
        }
    ]
    assert not any(row["name"] == "typo" for row in listing["plugins"])
