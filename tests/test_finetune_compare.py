"""Fine-tuning and transfer from a checkpoint (``[student] checkpoint``: the position
embedding resampled as timm does it, class and distillation tokens kept, heads
re-initialised for a new class count), fine-tuning with distillation at another
resolution (the paper's 224 -> 384 step, with the teacher at the target resolution),
and ``deitctl compare``. Tiny models on the shipped CIFAR-10 sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, read_metrics
from conftest import invoke as deitctl

from deitctl.tomlio import dump_toml

FIVE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path": 0.0}
TEACHER = {"plugin": "timm", "model": "resnet18", "channels": [8, 16, 32, 64]}


def _recipe(
    tmp: Path,
    name: str,
    *,
    root: Path = SAMPLE,
    strategy: str = "none",
    student: dict | None = None,
    teacher: dict | None = None,
    **sections: dict,
) -> Path:
    """A tiny recipe file: 4 training and 2 validation images a class, one epoch, CPU."""
    distilled = strategy == "token"
    raw = {
        "run": {
            "name": name,
            "output_dir": str(tmp / name),
            "epochs": 1,
            "seed": 0,
            "device": "cpu",
            "progress": "none",
        },
        "data": {
            "root": str(root),
            "img_size": 32,
            "batch_size": 8,
            "num_workers": 0,
            "repeated_aug": 1,
            "train_per_class": 4,
            "val_per_class": 2,
        },
        "student": {
            "plugin": "deit",
            "model": "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224",
            **TINY,
            **(student or {}),
        }
        if (student or {}).get("plugin", "deit") == "deit"
        else dict(student),
        "augmentation": {"plugin": "simple"},
        "distillation": {"strategy": strategy},
        "optimizer": {"lr": 1e-3, "lr_base_batch": 8},
        "schedule": {"warmup_epochs": 0},
        "ema": {"enabled": False},
    }
    if teacher is not None:
        raw["teacher"] = teacher
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp / f"{name}.toml"
    path.write_text(dump_toml(raw), encoding="utf-8")
    return path


def _train(recipe: Path, *sets: str):
    args = ["train", str(recipe)]
    for item in sets:
        args += ["--set", item]
    return deitctl(*args)


# --------------------------------------------------------------------------- tiny runs shared by the tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def teacher_run(runs) -> Path:
    """A tiny CNN teacher (narrow ResNet-18), one epoch on the 10-class sample."""
    result = _train(_recipe(runs, "teacher", student=dict(TEACHER)))
    assert result.exit_code == 0, result.output
    return runs / "teacher"


@pytest.fixture(scope="module")
def plain_run(runs) -> Path:
    """A tiny plain DeiT, 10 classes, 32 px, no distillation."""
    result = _train(_recipe(runs, "plain"))
    assert result.exit_code == 0, result.output
    return runs / "plain"


@pytest.fixture(scope="module")
def token_run(runs, teacher_run) -> Path:
    """A tiny distilled DeiT (token strategy), 10 classes, 32 px."""
    teacher = {**TEACHER, "checkpoint": str(teacher_run / "best.pt")}
    result = _train(_recipe(runs, "token32", strategy="token", teacher=teacher))
    assert result.exit_code == 0, result.output
    return runs / "token32"


# --------------------------------------------------------------------------- position embedding


def _deit(img_size: int, patch_size: int, *, distilled: bool = True, num_classes: int = 10):
    import timm

    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    return timm.create_model(
        name, num_classes=num_classes, img_size=img_size, patch_size=patch_size, depth=1, embed_dim=32, num_heads=2
    )


@pytest.mark.parametrize(
    "source_size, target_size",
    [((224, 16), (32, 8)), ((224, 16), (64, 16)), ((224, 16), (384, 16)), ((32, 8), (48, 8))],
    ids=["14x14-to-4x4", "14x14-to-4x4-same-patch", "14x14-to-24x24-paper", "4x4-to-6x6-fixres"],
)
def test_pos_embed_is_resampled_as_timm_does_and_tokens_are_kept(source_size, target_size, tmp_path):
    from timm.layers import resample_abs_pos_embed

    from deitctl.finetune import init_student
    from deitctl.recipe import recipe_from_dict

    torch.manual_seed(0)
    source = _deit(*source_size)
    with torch.no_grad():  # not the initial values: every row distinct
        for p in (source.pos_embed, source.cls_token, source.dist_token):
            p.normal_()
    path = tmp_path / "source.pth"
    torch.save({"model": source.state_dict()}, path)
    target = _deit(*target_size)

    notes = init_student(target, str(path), recipe_from_dict({}, "test"))

    grid = target_size[0] // target_size[1]
    old_grid = source_size[0] // source_size[1]
    # by hand: two prefix tokens (class, distillation) kept, the grid resampled bicubic
    # (without antialiasing, as the official DeiT code's F.interpolate)
    expected = resample_abs_pos_embed(
        source.pos_embed.detach(), new_size=[grid, grid], num_prefix_tokens=2, interpolation="bicubic", antialias=False
    )
    assert tuple(target.pos_embed.shape) == (1, 2 + grid * grid, 32)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.pos_embed[:, :2].detach(), source.pos_embed[:, :2].detach())
    torch.testing.assert_close(target.cls_token.detach(), source.cls_token.detach())
    torch.testing.assert_close(target.dist_token.detach(), source.dist_token.detach())
    # same class count: both heads and the blocks come from the checkpoint
    for key in ("head.weight", "head_dist.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key])
    if grid != old_grid:
        assert any(f"{grid}x{grid}" in n for n in notes), notes


def test_pos_embed_from_a_plain_checkpoint_into_a_distilled_student(tmp_path):
    """A plain DeiT's weights into a distilled student: the class token's position row
    serves both prefix tokens, the distillation token starts as the class token."""
    from timm.layers import resample_abs_pos_embed

    from deitctl.finetune import init_student
    from deitctl.recipe import recipe_from_dict

    torch.manual_seed(0)
    source = _deit(32, 8, distilled=False)
    with torch.no_grad():
        source.pos_embed.normal_()
        source.cls_token.normal_()
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    target = _deit(48, 8)
    notes = init_student(target, str(path), recipe_from_dict({}, "test"))
    pos = source.pos_embed.detach()
    with_dist_row = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    expected = resample_abs_pos_embed(
        with_dist_row, new_size=[6, 6], num_prefix_tokens=2, interpolation="bicubic", antialias=False
    )
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.dist_token.detach(), source.cls_token.detach())
    assert any("distillation token initialised" in n for n in notes), notes


# --------------------------------------------------------------------------- transfer to 5 classes


def _five_class_root(tmp: Path) -> Path:
    root = tmp / "five"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for name in FIVE_CLASSES:
            (root / split / name).symlink_to(SAMPLE / split / name, target_is_directory=True)
    return root


def test_transfer_to_five_classes_reinitialises_the_heads(plain_run, tmp_path):
    from deitctl.assembly import assemble
    from deitctl.recipe import load_recipe

    source = torch.load(plain_run / "best.pt", weights_only=True)
    assert source["model"]["head.weight"].shape[0] == 10
    recipe = _recipe(
        tmp_path, "five", root=_five_class_root(tmp_path), student={"checkpoint": str(plain_run / "best.pt")}
    )

    parts = assemble(load_recipe(recipe))
    state = parts.student.state_dict()
    assert parts.classes == FIVE_CLASSES
    assert tuple(state["head.weight"].shape) == (5, 32) and tuple(state["head.bias"].shape) == (5,)
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token", "norm.bias"):
        torch.testing.assert_close(state[key], source["model"][key])
    assert any("re-initialised for 5 classes" in n for n in parts.notes), parts.notes

    result = _train(recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "five"
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["classes"] == FIVE_CLASSES and tuple(ckpt["model"]["head.weight"].shape) == (5, 32)

    result = deitctl("eval", "--ckpt", str(run / "best.pt"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["images"] == 10  # 5 classes x 2
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 100


# --------------------------------------------------------------------------- fine-tuning with distillation, FixRes


def _finetune_sets(token_run: Path, teacher_run: Path, out: Path) -> list[str]:
    """recipes/deit_b_384_finetune.toml, shrunk: a 48-px student from the 32-px
    checkpoint, the teacher at 64 px."""
    return [
        f"run.output_dir={json.dumps(str(out))}",
        "run.epochs=1",
        "run.precision=fp32",
        "run.progress=none",
        f"data.root={json.dumps(str(SAMPLE))}",
        "data.train_per_class=4",
        "data.val_per_class=2",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.img_size=48",
        *(f"student.{k}={v}" for k, v in TINY.items()),
        f"student.checkpoint={json.dumps(str(token_run / 'best.pt'))}",
        'teacher.model="resnet18"',
        "teacher.channels=[8, 16, 32, 64]",
        "teacher.input_size=64",
        f"teacher.checkpoint={json.dumps(str(teacher_run / 'best.pt'))}",
    ]


def test_finetune_with_distillation_at_a_new_resolution(token_run, teacher_run, tmp_path):
    from timm.layers import resample_abs_pos_embed

    from deitctl.recipe import load_recipe
    from deitctl.trainer import Trainer

    recipe_file = ROOT / "recipes" / "deit_b_384_finetune.toml"
    sets = _finetune_sets(token_run, teacher_run, tmp_path / "ft")
    result = _train(recipe_file, *sets)
    assert result.exit_code == 0, result.output
    assert "position embedding resampled to a 6x6 grid" in result.output
    (m,) = read_metrics(tmp_path / "ft")
    assert m["epoch"] == 1 and {"acc1", "acc1_cls", "acc1_dist"} <= m.keys()
    resolved = (tmp_path / "ft" / "recipe.toml").read_text()
    assert "img_size = 48" in resolved and "input_size = 64" in resolved and 'strategy = "token"' in resolved

    result = deitctl("eval", "--ckpt", str(tmp_path / "ft" / "last.pt"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"acc1", "acc1_cls", "acc1_dist", "teacher_agreement"} <= metrics.keys()

    # the student starts from the 32-px checkpoint (position embedding 4x4 -> 6x6), and the
    # teacher sees the batch at its own resolution, 64 px
    trainer = Trainer(load_recipe(recipe_file, _finetune_sets(token_run, teacher_run, tmp_path / "x")))
    source = torch.load(token_run / "best.pt", weights_only=True)["model"]
    expected = resample_abs_pos_embed(
        source["pos_embed"], new_size=[6, 6], num_prefix_tokens=2, interpolation="bicubic", antialias=False
    )
    torch.testing.assert_close(trainer.student.pos_embed.detach(), expected)
    torch.testing.assert_close(trainer.student.dist_token.detach(), source["dist_token"])
    seen = []
    trainer.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    images, _ = next(iter(trainer.parts.train_loader))
    assert tuple(images.shape[-2:]) == (48, 48)
    trainer.teacher(images)
    assert seen == [(8, 3, 64, 64)]


# --------------------------------------------------------------------------- compare


def test_compare_two_runs_table_and_json(plain_run, token_run):
    result = deitctl("compare", str(plain_run), str(token_run))
    assert result.exit_code == 0, result.output
    for text in ("plain", "token32", "none", "token", "resnet18", "best top-1", "agreement", "images/s"):
        assert text in result.stdout, text

    result = deitctl("compare", str(plain_run), str(token_run), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["run"] for r in rows] == ["plain", "token32"]
    assert [r["strategy"] for r in rows] == ["none", "token"]
    assert [r["teacher"] for r in rows] == [None, "resnet18"]
    for row, run in zip(rows, (plain_run, token_run)):
        lines = read_metrics(run)
        assert row["best_acc1"] == pytest.approx(max(m["acc1"] for m in lines))
        assert row["last_acc1"] == pytest.approx(lines[-1]["acc1"]) and row["acc5"] == pytest.approx(lines[-1]["acc5"])
        assert row["epochs"] == 1 and row["images_per_s"] > 0
        assert {"recipe", "student", "teacher_agreement", "epochs_planned"} <= row.keys()
    assert rows[1]["acc1_cls"] is not None and rows[0]["acc1_cls"] is None


def test_compare_falls_back_to_the_checkpoint_withoutread_metrics(plain_run, tmp_path):
    run = tmp_path / "copied"
    run.mkdir()
    shutil.copy(plain_run / "recipe.toml", run)
    shutil.copy(plain_run / "last.pt", run)
    result = deitctl("compare", str(run), "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["run"] == "copied" and row["epochs"] == 1
    assert row["best_acc1"] == pytest.approx(read_metrics(plain_run)[-1]["best_acc1"])


def test_compare_rejects_a_directory_that_is_not_a_run(plain_run, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    for args in (
        [str(empty)],
        [str(plain_run), str(empty)],
        [str(empty), "--json"],
        [str(tmp_path / "missing")],
        [str(empty / "notes.txt")],
    ):
        result = deitctl("compare", *args)
        assert result.exit_code == 2, (args, result.output)
        assert Path(args[-1] if args[-1] != "--json" else args[0]).name in result.output
        assert "Traceback" not in result.output
