"""``deitctl benchmark``: one JSON object with the five figures; bad input is exit 2."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from conftest import ROOT, SAMPLE, runner
from conftest import TINY as TINY_RECIPE

from deitctl.benchmark import KEYS, tuning_table
from deitctl.cli import app
from deitctl.tuning import row_label

TINY = [
    f"data.root={json.dumps(str(SAMPLE))}",
    "data.train_per_class=2",
    "data.val_per_class=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "student.depth=1",
    "student.embed_dim=32",
    "student.num_heads=2",
    "teacher.channels=[8, 16, 32, 64]",
    # no such file: the benchmark warns and times a teacher with random weights
    'teacher.checkpoint="does-not-exist/best.pt"',
]


def _args(*extra: str) -> list[str]:
    args = ["benchmark", str(ROOT / "recipes" / "quickstart.toml"), "--steps", "2", "--warmup", "1", "--json"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


def test_benchmark_json_has_the_figures_the_machine_and_a_verdict(tmp_path):
    out = tmp_path / "never-written"
    result = runner.invoke(app, _args(f"run.output_dir={json.dumps(str(out))}"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    figures = json.loads(lines[0])
    for key in (*KEYS, "flops_per_image", "matmul_utilization"):
        value = figures[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert value > 0, (key, value)
    assert 0 < figures["teacher_share"] < 1
    machine = figures["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert machine["threads"] == torch.get_num_threads() and machine["name"]
    assert set(figures["matmul_flops_per_s"]) == {"fp32"}  # an fp32 recipe may use fp32 only
    # achieved FLOP/s over the matmul peak, both from this invocation
    achieved = figures["flops_per_image"] * figures["train_images_per_s"]
    assert figures["matmul_utilization"] == pytest.approx(achieved / figures["matmul_flops_per_s"]["fp32"])
    assert figures["bound"] in ("data", "teacher", "compute") and f"{figures['bound']}-bound: " in figures["verdict"]
    # the recipe's own settings were benchmarked: fp32 and eager as it fixes them (attention on auto)
    assert re.fullmatch(r"fp32, (fused|math|cpp) attention, (channels_last teacher, )?eager", figures["speed"])
    assert not out.exists()  # the output directory is not written


def test_benchmark_tune_times_every_candidate_and_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DEITCTL_CACHE_DIR", str(tmp_path / "cache"))
    args = ["benchmark", str(TINY_RECIPE), "--steps", "2", "--warmup", "1", "--json", "--tune"]
    result = runner.invoke(app, [*args, "--set", f"data.root={json.dumps(str(SAMPLE))}"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # every candidate timed (as if every speed key were "auto"), and kept for later runs
    labels = {row_label(row) for row in figures["tuning"]}
    for precision, attention in itertools.product(("fp32", "bf16"), ("fused", "math")):
        assert f"{precision}, {attention} attention, eager" in labels
    assert any("GELU backward saved" in label for label in labels)
    assert any("GELU backward recompute" in label for label in labels)
    assert figures["tuned"] in labels
    assert (tmp_path / "cache" / "speed.json").is_file()
    table = " ".join(capture(tuning_table(figures)).split())
    assert "fp32, fused attention, eager" in table and "compile s" in table


def capture(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_benchmark_bad_recipe_is_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nepochs = "many"\n', encoding="utf-8")
    result = runner.invoke(app, ["benchmark", str(bad), "--steps", "1", "--json"])
    assert result.exit_code == 2
    assert "bad.toml" in result.output and "Traceback" not in result.output


def test_benchmark_bad_override_and_missing_data_are_exit_2(tmp_path):
    result = runner.invoke(app, _args("student.no_such_key=1"))
    assert result.exit_code == 2
    result = runner.invoke(app, _args(f"data.root={json.dumps(str(tmp_path / 'nothing'))}"))
    assert result.exit_code == 2 and "data.root" in result.output


def test_benchmark_bad_steps_is_a_usage_error():
    result = runner.invoke(app, ["benchmark", str(ROOT / "recipes" / "quickstart.toml"), "--steps", "0"])
    assert result.exit_code == 2


def test_cpu_peak_memory_is_measured_after_larger_earlier_work_in_the_process(tmp_path):
    """Memory an earlier job in the same process freed (and the heap kept) must not hide the
    benchmark's own: free heap memory is returned first and the peak mark reset."""
    import platform

    import pytest
    import torch

    from deitctl.runtime import retain_freed_memory

    if platform.system() != "Linux":
        pytest.skip("the peak mark is reset through /proc (Linux)")
    args = _args(
        f"run.output_dir={json.dumps(str(tmp_path / 'unused'))}",
        "data.train_per_class=4",
        "data.batch_size=32",
        "student.embed_dim=64",
    )
    assert runner.invoke(app, args).exit_code == 0  # imports and first-call caches, out of the way
    retain_freed_memory()
    big = torch.ones(512 * 2**20 // 4)  # 512 MiB touched, then freed into the heap, which keeps it
    del big
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert 5 < figures["peak_memory_mb"] < 512, figures  # the lifetime peak (getrusage) gave 0.1 here
