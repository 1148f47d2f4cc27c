"""The scripts under benchmarks/ run end to end (one tiny round each): they are how the
figures in benchmarks/README.md are reproduced, so they must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # whole scripts in subprocesses

TINY = ["--depth", "1", "--batch", "8"]


def _script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_step_vs_reference_runs_each_side_in_its_own_process(tmp_path):
    out = tmp_path / "result.json"
    text = _script(
        "step_vs_reference.py",
        *TINY,
        "--rounds",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--shape",
        "quickstart",
        "--variants",
        "deitctl,auto",
        "--auto-keys",
        "precision,attention",  # compiling candidates is what the test of deitctl.tuning covers
        "--json",
        str(out),
    )
    assert "isolation process" in text
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["results"]}
    assert set(rows) == {"reference", "deitctl", "auto"} and not any("error" in row for row in rows.values())
    assert rows["reference"]["ratio"] == 1.0 and rows["deitctl"]["ratio"] > 0
    assert all(row["images_per_s"] > 0 and row["page_faults_per_step"] >= 0 for row in rows.values())
    assert result["machine"]["name"] and result["machine"]["threads"] >= 1
    totals = result["summary"]
    assert totals["fastest_fixed"] == "deitctl" and totals["fp32_vs_reference"] == rows["deitctl"]["ratio"]
    assert totals["auto_vs_fp32"] == rows["auto"]["ratio"] / rows["deitctl"]["ratio"]
    assert "attention" in totals["auto_chosen"] and totals["auto_tuning_s"] > 0
    assert f"auto chose: {totals['auto_chosen']}" in text


def test_step_processes_alternates_recipe_variants(tmp_path):
    recipe = tmp_path / "model.toml"
    _script("step_vs_reference.py", *TINY, "--write-recipe", str(recipe))
    assert tomllib.loads(recipe.read_text())["data"]["batch_size"] == 8
    text = _script(
        "step_processes.py",
        str(recipe),
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--variant",
        "",
        "--variant",
        "run.threads=1",
    )
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("the recipe", "run."))}
    assert set(lines) == {"the", "run.threads=1"}, text
    assert float(lines["the"][3]) == 1.0 and float(lines["run.threads=1"][2]) > 0, text


def test_profile_step_lists_the_matmuls_by_their_shapes(tmp_path):
    recipe = tmp_path / "model.toml"
    _script("step_vs_reference.py", *TINY, "--write-recipe", str(recipe))
    out = tmp_path / "profile.json"
    text = _script("profile_step.py", str(recipe), "--steps", "2", "--warmup", "1", "--shapes", "--json", str(out))
    assert "matmuls by operand shapes" in text
    rows = json.loads(out.read_text())["matmuls_by_shape"]
    times = [row["ms_per_step"] for row in rows]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    # the student's qkv projection over the batch's tokens (8 images x 66 tokens, 192 wide), once a step
    qkv = [row for row in rows if row["shapes"] == [[576], [528, 192], [192, 576]]]
    assert len(qkv) == 1 and qkv[0]["calls_per_step"] == 1 and qkv[0]["gflop_per_s"] > 0, rows


def test_loader_compares_the_loaders_and_profiles_the_stages(tmp_path):
    from conftest import SAMPLE

    common = ["--source", str(SAMPLE), "--images", "20", "--batch", "4", "--work", str(tmp_path), "--json"]
    result = json.loads(_script("loader.py", *common, "--rounds", "1", "--workers", "1"))
    assert set(result["median"]) == {"plain", "folder", "shards", "shards320"}
    assert all(m["wall"] > 0 and m["per_cpu_s"] > 0 for m in result["median"].values())
    assert result["vs_plain"]["plain"]["wall"] == 1.0
    stages = json.loads(_script("loader.py", *common, "--profile"))["ms_per_image"]
    assert {"decode", "crop", "randaugment", "to_uint8+erasing", "batch"} <= set(stages["deitctl shards320"])
    assert {"to_tensor", "normalize", "erasing"} <= set(stages["plain jpeg"])


def _gpu_dry_run(out: Path, compiles: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "BATCH": "2",
        "STEPS": "1",
        "WARMUP": "0",
        "COMPILES": compiles,
        "LOADER_IMAGES": "20",
        "LOADER_ROUNDS": "1",
        "LOADER_BATCH": "4",
        "WORKERS": "1",
        "PYTHON": sys.executable,
        "EXTRA_SETS": "student.depth=1 data.img_size=64 teacher.model=regnety_002",
    }
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu.sh is prepared for a GPU machine; its CPU dry run checks it end to end."""
    proc = _gpu_dry_run(tmp_path / "out", "false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    eager = summary["compile_false"]
    assert eager["train_images_per_s"] > 0 and 0 < eager["matmul_utilization"] < 1
    assert eager["train_images_per_s_cached"] > 0 and eager["bound"] in ("data", "teacher", "compute")
    assert summary["machine"]["device"] == "cpu" and summary["loader"] and summary["failed"] == {}


def test_gpu_script_keeps_the_other_measurements_when_one_fails(tmp_path):
    """A GPU lease is short: a failing measurement is recorded, the rest still run and report."""
    proc = _gpu_dry_run(tmp_path / "out", "false maybe")  # run.compile = maybe: a recipe error
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["compile_false"]["train_images_per_s"] > 0 and summary["loader"]
    assert "compile_maybe" not in summary
    assert any("run.compile" in line for line in summary["failed"]["deit_s_regnety160_compile_maybe"])
    assert "deit_s_regnety160_compile_maybe failed" in proc.stderr


def test_cifar10_archive_writes_what_the_importer_reads_pixel_for_pixel(tmp_path):
    import numpy as np
    from PIL import Image

    from deitctl.cifar10 import import_cifar10

    sample = ROOT / "data" / "cifar10-sample"
    archive = tmp_path / "cifar-10-python.tar.gz"
    assert "training and" in _script("cifar10_archive.py", str(sample), str(archive))
    counts = import_cifar10(tmp_path / "cifar10", archive=archive)
    train = sorted((sample / "train").rglob("*.jpg"))
    assert counts == {"train": len(train), "test": len(list((sample / "val").rglob("*.jpg")))}
    first = sorted((sample / "val" / "airplane").iterdir())[0]  # test images keep their order
    imported = sorted((tmp_path / "cifar10" / "test" / "airplane").iterdir())[0]
    with Image.open(first) as a, Image.open(imported) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))
