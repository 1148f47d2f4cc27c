"""End-to-end: train every built-in strategy and the paper recipes on a few real
CIFAR-10 images, then evaluate and predict with the results."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE
from conftest import cli as deitctl

SMALL_DATA = [
    f"data.root={json.dumps(str(SAMPLE))}",
    "data.train_per_class=4",
    "data.val_per_class=2",
    "data.num_workers=0",
    "data.batch_size=8",
    "run.progress=none",
]
TINY_STUDENT = ["student.depth=2", "student.embed_dim=32", "student.num_heads=2", "student.patch_size=8"]


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A small CNN teacher trained for one epoch by the quickstart's teacher recipe."""
    out = tmp_path_factory.mktemp("teacher")
    code, text = _train(
        ROOT / "recipes/quickstart_teacher.toml", out, ["run.epochs=1", "student.channels=[8, 16, 32, 64]"]
    )
    assert code == 0, text
    assert (out / "best.pt").is_file()
    return out / "best.pt"


def _train(recipe: Path, out: Path, overrides: list[str]) -> tuple[int, str]:
    args = ["train", str(recipe), "--output-dir", str(out)]
    for item in SMALL_DATA + overrides:
        args += ["--set", item]
    return deitctl(*args)


def _student_recipe(strategy: str, teacher: Path) -> list[str]:
    model = "deit_tiny_distilled_patch16_224" if strategy == "token" else "deit_tiny_patch16_224"
    return TINY_STUDENT + [
        f"distillation.strategy={strategy}",
        f'student.model="{model}"',
        f"teacher.checkpoint={json.dumps(str(teacher))}",
        "teacher.channels=[8, 16, 32, 64]",
        "run.epochs=2",
    ]


@pytest.mark.parametrize("strategy", ["none", "soft", "hard", "token"])
def test_every_strategy_trains_and_evaluates(strategy, teacher_ckpt, tmp_path):
    out = tmp_path / strategy
    code, text = _train(ROOT / "recipes/quickstart.toml", out, _student_recipe(strategy, teacher_ckpt))
    assert code == 0, text
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("train_loss", "lr", "acc1", "acc5", "images_per_s"):
            assert key in m and m[key] == m[key]  # present and not NaN
    assert tomllib.loads((out / "recipe.toml").read_text())["distillation"]["strategy"] == strategy
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["classes"][0] == "airplane"
    assert "optimizer" in ckpt and "rng" in ckpt and ckpt["recipe"].startswith("[run]")

    code, text = deitctl("eval", "--ckpt", str(out / "best.pt"), "--json")
    assert code == 0, text
    metrics = json.loads(text.strip().splitlines()[-1])
    assert metrics["images"] == 20
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 100 and metrics["loss"] > 0
    assert 0 <= metrics["teacher_agreement"] <= 100  # the recipe has a teacher
    if strategy == "token":
        assert {"acc1_cls", "acc1_dist"} <= metrics.keys()
    else:
        assert "acc1_cls" not in metrics


def test_teacher_weights_are_frozen_and_loaded(teacher_ckpt, tmp_path):
    """The teacher in training is the checkpoint's, unchanged after a run."""
    from deitctl.recipe import load_recipe
    from deitctl.trainer import Trainer

    recipe = load_recipe(
        ROOT / "recipes/quickstart.toml",
        SMALL_DATA
        + _student_recipe("hard", teacher_ckpt)
        + [f"run.output_dir={json.dumps(str(tmp_path))}", "run.epochs=1"],
    )
    trainer = Trainer(recipe)
    saved = torch.load(teacher_ckpt, weights_only=True)["model"]
    before = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()}
    for key, value in saved.items():
        torch.testing.assert_close(before[key], value)
    trainer.fit()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    for key, value in trainer.teacher.model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_predict_top_k(teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    code, text = _train(
        ROOT / "recipes/quickstart.toml", out, _student_recipe("token", teacher_ckpt) + ["run.epochs=1"]
    )
    assert code == 0, text
    images = [SAMPLE / "val" / "cat" / "0000.jpg", SAMPLE / "val" / "ship" / "0001.jpg"]
    code, text = deitctl("predict", "--ckpt", str(out / "last.pt"), "--json", "-k", "3", *map(str, images))
    assert code == 0, text
    result = json.loads(text)
    assert [r["image"] for r in result] == [str(p) for p in images]
    for r in result:
        probs = [row["probability"] for row in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(
            row["class"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
            for row in r["top"]
        )
    code, text = deitctl("predict", "--ckpt", str(out / "last.pt"), str(ROOT / "README.md"))
    assert code == 2 and "README.md" in text and "Traceback" not in text


@pytest.fixture(scope="module")
def regnety_teacher(tmp_path_factory) -> Path:
    """A RegNetY-16GF (random weights, 10 classes) in the official format ({"model": state_dict}):
    80 M parameters, written once for the three paper recipes."""
    import timm

    teacher_file = tmp_path_factory.mktemp("regnety") / "regnety_160-a5fe301d.pth"
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("regnety_160", num_classes=10).state_dict()}, teacher_file)
    return teacher_file


@pytest.mark.parametrize("size", ["ti", "s", "b"])
def test_paper_recipes_train_on_a_few_images(size, regnety_teacher, tmp_path):
    """The paper's recipes, with data, size and epochs overridden; the RegNetY-16GF teacher
    is loaded from a local file in the official format ({"model": state_dict})."""
    teacher_file = regnety_teacher
    overrides = [
        "data.img_size=32",
        "data.train_per_class=2",  # 20 images, 60 samples with repeated_aug 3: the big teacher
        "data.val_per_class=1",  # runs on few images
        "run.epochs=1",
        "data.repeated_aug=3",
        "teacher.input_size=32",
        f"teacher.checkpoint={json.dumps(str(teacher_file))}",
        "ema.enabled=true",
    ]
    if size == "b":
        overrides += ["student.depth=2"]
    code, text = _train(ROOT / f"recipes/regnet_to_deit_{size}.toml", tmp_path / "run", overrides)
    assert code == 0, text
    code, text = deitctl("eval", "--ckpt", str(tmp_path / "run" / "last.pt"), "--json")
    assert code == 0, text
    metrics = json.loads(text.strip().splitlines()[-1])
    assert {"acc1", "acc5", "loss", "images", "acc1_cls", "acc1_dist", "teacher_agreement"} <= metrics.keys()
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "acc1_ema" in m


@pytest.mark.slow
def test_compile_bf16_and_channels_last_teacher(teacher_ckpt, tmp_path):
    """run.compile compiles student and teacher; bf16 autocast on CPU; a channels_last teacher."""
    out = tmp_path / "compiled"
    code, text = _train(
        ROOT / "recipes/quickstart.toml",
        out,
        _student_recipe("token", teacher_ckpt)
        + ["run.epochs=1", "run.compile=true", "run.precision=bf16", "run.channels_last=true", "student.depth=1"],
    )
    assert code == 0, text
    # run.gelu_backward = "auto" with compile on: both backwards timed, the faster taken
    assert "compiled, GELU backward recompute:" in text and "compiled, GELU backward saved:" in text
    assert re.search(r"speed \(measured in [0-9.]+ s\): bf16, \w+ attention, channels_last teacher, compiled", text)
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["train_loss"] == m["train_loss"] and "teacher_agreement" in m
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    code, text = deitctl("eval", "--ckpt", str(out / "last.pt"), "--json")
    assert code == 0, text
