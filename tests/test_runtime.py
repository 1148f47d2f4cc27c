"""Speed settings: precision "auto", the attention kernel, the optimizer implementation
and the thread count, each checked on a real (tiny) trainer or model."""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT, runner

from deitctl.cli import app
from deitctl.optim import optimizer_implementation
from deitctl.recipe import load_recipe
from deitctl.runtime import resolve_attention, resolve_precision, set_attention
from deitctl.trainer import Trainer

CPU = torch.device("cpu")

SYNTHETIC = [
    'data.dataset="synthetic"',
    "data.img_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.num_classes=10",
    "data.repeated_aug=1",
    "data.length=16",
    'student.model="deit_tiny_patch16_224"',
    "student.depth=2",
    "student.embed_dim=32",
    "student.num_heads=2",
    "student.patch_size=8",
    'distillation.strategy="none"',
    "run.progress=none",
    'run.device="cpu"',
    "run.epochs=1",
]


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    recipe = load_recipe(
        ROOT / "recipes/quickstart.toml", [*SYNTHETIC, f"run.output_dir={json.dumps(str(tmp_path))}", *overrides]
    )
    return Trainer(recipe)


def _cli_train(out: Path, *overrides: str):
    args = ["train", str(ROOT / "recipes/quickstart.toml"), "--output-dir", str(out)]
    for item in [*SYNTHETIC, *overrides]:
        args += ["--set", item]
    return runner.invoke(app, args)


def test_auto_rules_of_evaluation_and_prediction():
    # training measures (tests/test_tuning.py); eval and predict take fp32 and the fused kernel on CPU
    assert resolve_attention("auto") == "fused"
    assert resolve_attention("math") == "math"
    assert resolve_precision(CPU, "fp16") == "fp16"
    assert resolve_precision(CPU, "auto") == "fp32"


def test_math_and_fused_attention_compute_the_same_function():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    assert set_attention(model, "fused") == 2
    with torch.no_grad():
        fused = model(x)
    assert set_attention(model, "math") == 2
    assert all(not b.attn.fused_attn for b in model.blocks)
    with torch.no_grad():
        math = model(x)
    torch.testing.assert_close(math, fused, rtol=1e-4, atol=1e-5)


def test_trainer_applies_its_attention_kernel_and_fused_adamw(tmp_path):
    t = _trainer(tmp_path, 'run.precision="bf16"', 'run.attention="math"')
    assert t.attention == "math" and t.precision == "bf16"
    assert all(not b.attn.fused_attn for b in t.student.blocks)
    assert optimizer_implementation(t.optimizer) == "fused"
    t32 = _trainer(tmp_path / "fp32", 'run.attention="fused"')
    assert t32.attention == "fused" and all(b.attn.fused_attn for b in t32.student.blocks)
    # on auto, the measured kernel is the one the blocks run
    auto = _trainer(tmp_path / "auto", 'run.attention="auto"')
    assert auto.tuning.how in ("measured", "cached")
    assert all(b.attn.fused_attn == (auto.attention == "fused") for b in auto.student.blocks)


@pytest.mark.parametrize("impl,expected", [("loop", "loop"), ("foreach", "foreach"), ("fused", "fused")])
def test_optimizer_implementation_is_chosen(tmp_path, impl, expected):
    t = _trainer(tmp_path, f'optimizer.implementation="{impl}"')
    assert optimizer_implementation(t.optimizer) == expected


def test_auto_falls_back_for_an_optimizer_without_fused(tmp_path):
    t = _trainer(tmp_path, 'optimizer.name="lamb"')
    assert type(t.optimizer).__name__ == "Lamb"


def test_an_impossible_implementation_is_a_recipe_error(tmp_path):
    result = _cli_train(tmp_path / "out", 'optimizer.name="lamb"', 'optimizer.implementation="fused"')
    assert result.exit_code == 2, result.output
    assert "optimizer.implementation" in result.output and "lamb" in result.output
    assert not (tmp_path / "out" / "last.pt").exists()


def test_threads_setting(tmp_path):
    before = torch.get_num_threads()
    wanted = before + 1  # a count the process does not have yet (the suite runs on 1 thread)
    try:
        _trainer(tmp_path, f"run.threads={wanted}")
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_auto_precision_is_measured_logged_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEITCTL_CACHE_DIR", str(tmp_path / "cache"))
    result = _cli_train(tmp_path / "out", 'run.precision="auto"', 'run.progress="plain"')
    assert result.exit_code == 0, result.output
    assert "measuring the speed settings left to auto" in result.output
    for candidate in ("fp32, fused attention, eager", "bf16, fused attention, eager", "bf16, math attention, eager"):
        assert candidate in result.output
    chosen = next(line for line in result.output.splitlines() if line.startswith("speed (measured in "))
    assert "optimizer adamw (fused)" in result.output
    if platform.libc_ver()[0] == "glibc":
        assert "freed host memory kept for reuse" in result.output
    assert (tmp_path / "out" / "last.pt").is_file()
    assert (tmp_path / "cache" / "speed.json").is_file()
    # the next run of the same shapes starts at once, with the same choice
    again = _cli_train(tmp_path / "again", 'run.precision="auto"', 'run.progress="plain"')
    assert again.exit_code == 0, again.output
    assert "measuring the speed settings" not in again.output
    label = re.fullmatch(r"speed \(measured in [0-9.]+ s\): (.*?)(, [0-9.]+× the speed of .*)?", chosen)
    assert label, chosen
    assert f"speed (cached): {label[1]}" in again.output


_FAULTS = """
import resource, sys, torch
from deitctl.runtime import configure_process
retained = configure_process(0, sys.argv[1] == "on")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the first uses fault the pages in either way
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = faults()
for _ in range(10):  # what every training step does with its activation buffers
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(retained, faults() - before)
"""


def _faults(setting: str) -> tuple[bool, int]:
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, check=True).stdout
    retained, faults = out.split()[-2:]
    return retained == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux", reason="glibc's malloc only")
def test_retained_host_memory_is_reused_instead_of_faulted_in_every_time():
    retained, faults_on = _faults("on")
    kept, faults_off = _faults("off")
    assert retained and not kept
    if faults_off < 100:
        pytest.skip(f"this system maps freed 64 MiB blocks back cheaply ({faults_off} faults): nothing to compare")
    assert faults_on * 4 < faults_off, (faults_on, faults_off)
