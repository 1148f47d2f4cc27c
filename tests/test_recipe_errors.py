"""Recipe handling through the real CLI: bad recipes exit 2 with one clear
message naming the file and the key (no traceback); good recipes validate,
round-trip through ``recipe show`` and accept ``--set``.

Every recipe here is tiny (a 2-block DeiT at 32 px) and built on the meta
device by ``recipe validate``, so the whole file runs in seconds.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deitctl.cli import app
from deitctl.errors import RecipeError, UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.toml") if p.is_file())

# --------------------------------------------------------------------------- helpers

TINY_DISTILLED = {
    "plugin": "deit",
    "model": "deit_tiny_distilled_patch16_224",
    "patch_size": 8,
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 2,
    "drop_path": 0.0,
}
TINY_PLAIN = {**TINY_DISTILLED, "model": "deit_tiny_patch16_224"}
TINY_TEACHER = {"plugin": "timm", "model": "resnet18", "channels": [32, 64, 128, 256], "stem_width": 32}

BASE: dict[str, dict[str, Any]] = {
    "run": {"name": "tiny", "epochs": 2, "device": "cpu", "precision": "fp32"},
    "data": {
        "dataset": "imagefolder",
        "root": "absent-data",
        "img_size": 32,
        "batch_size": 8,
        "num_workers": 0,
        "num_classes": 10,
        "repeated_aug": 1,
    },
    "student": TINY_DISTILLED,
    "teacher": TINY_TEACHER,
    "augmentation": {"plugin": "simple"},
    "distillation": {"strategy": "token"},
    "schedule": {"warmup_epochs": 1},
}

DELETE = object()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").isalnum() else json.dumps(k)


def make_recipe(changes: dict[str, Any] | None = None) -> str:
    """BASE with ``changes`` ({section: {key: value or DELETE}} or {section: DELETE}) as TOML text."""
    data = copy.deepcopy(BASE)
    for section, values in (changes or {}).items():
        if values is DELETE:
            data.pop(section, None)
            continue
        if not isinstance(values, dict):
            data[section] = values
            continue
        target = data.setdefault(section, {})
        for k, v in values.items():
            if v is DELETE:
                target.pop(k, None)
            else:
                target[k] = v
    lines = []
    for section, values in data.items():
        if not isinstance(values, dict):
            lines.append(f"{_toml_key(section)} = {_toml_value(values)}")
            continue
        lines.append(f"[{_toml_key(section)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _plain_env():
    """No third-party plugins, no colours, a wide console; a fresh registry."""
    from deitctl.registry import reset_registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEITCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.delenv("DEITCTL_PLUGINS", raising=False)
        mp.delenv("FORCE_COLOR", raising=False)
        mp.setenv("NO_COLOR", "1")
        mp.setenv("COLUMNS", "400")
        reset_registry()
        yield
    reset_registry()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args: str) -> Result:
    res = CliRunner().invoke(app, list(args))
    exc = res.exception
    if isinstance(exc, SystemExit):
        exc = None
    return Result(res.exit_code, res.stdout, res.stderr, exc)


# --------------------------------------------------------------------------- bad recipes


@dataclass
class Case:
    id: str
    recipe: Any  # dict of changes to BASE, raw TOML text (str), or None: no file at all
    expect: list[str]  # fragments the message must hold (besides file and key)
    key: str | None = None  # the dotted key the message must name, as "[key]"
    command: str = "validate"
    sets: list[str] = field(default_factory=list)
    names_file: bool = True
    marks: tuple = ()  # for test_bad_recipe only (the key tests hold for every case)


TOML_SYNTAX = """[run]
name = "tiny"
epochs = = 3
"""

CASES = [
    Case("missing-file", None, ["no such recipe file"]),
    Case("toml-syntax", TOML_SYNTAX, ["TOML syntax error", "line 3", "column"]),
    Case(
        "unknown-section",
        {"studnet": {"depth": 2}},
        ["unknown section [studnet]", "did you mean 'student'"],
        key="studnet",
    ),
    Case(
        "unknown-key-epoch",
        {"run": {"epoch": 5}},
        ["unknown key 'epoch'", "did you mean 'epochs'", "known keys:"],
        key="run.epoch",
    ),
    Case(
        "unknown-key-show",
        {"optimizer": {"weight_decai": 0.1}},
        ["unknown key 'weight_decai'", "did you mean 'weight_decay'"],
        key="optimizer.weight_decai",
        command="show",
    ),
    # [data] passes unknown keys to the dataset plugin; the hint still covers the section's own keys
    Case(
        "data-key-typo-did-you-mean",
        {"data": {"batchsize": 8}},
        ["'batchsize'", "did you mean 'batch_size'"],
        key="data.batchsize",
    ),
    Case("string-for-int", {"data": {"batch_size": "64"}}, ["expected an integer", "'64'"], key="data.batch_size"),
    Case("float-for-int", {"run": {"epochs": 1.5}}, ["expected an integer", "1.5"], key="run.epochs"),
    Case("bool-for-int", {"run": {"seed": True}}, ["expected an integer", "True"], key="run.seed"),
    Case("string-for-float", {"optimizer": {"lr": "fast"}}, ["expected a number", "'fast'"], key="optimizer.lr"),
    Case("int-for-bool", {"ema": {"enabled": 1}}, ["expected true or false"], key="ema.enabled"),
    Case("string-for-list", {"teacher": {"mean": "imagenet"}}, ["expected a list", "'imagenet'"], key="teacher.mean"),
    Case("list-message-grammar", {"teacher": {"mean": "imagenet"}}, ["expected a list of numbers"], key="teacher.mean"),
    Case("not-a-table", {"run": 5}, ["expected a table"], key="run"),
    Case("zero-batch-size", {"data": {"batch_size": 0}}, ["must be positive", "got 0"], key="data.batch_size"),
    Case(
        "zero-batch-size-show", {"data": {"batch_size": 0}}, ["must be positive"], key="data.batch_size", command="show"
    ),
    Case("negative-epochs", {"run": {"epochs": -3}}, ["must be positive", "-3"], key="run.epochs"),
    Case("negative-lr", {"optimizer": {"lr": -0.1}}, ["at least 0", "-0.1"], key="optimizer.lr"),
    Case(
        "precision-fp8",
        {"run": {"precision": "fp8"}},
        ["'fp8' is not one of", "'fp32'", "'bf16'", "'fp16'"],
        key="run.precision",
    ),
    Case(
        "schedule-choice", {"schedule": {"name": "cosin"}}, ["'cosin' is not one of", "'cosine'"], key="schedule.name"
    ),
    Case(
        "unknown-student-plugin",
        {"student": {"plugin": "deitt"}},
        ["unknown student plugin 'deitt'", "did you mean 'deit'", "known:", "deit, timm"],
        key="student.plugin",
    ),
    Case(
        "unknown-teacher-plugin",
        {"teacher": {"plugin": "acme-cnn"}},
        ["unknown teacher plugin 'acme-cnn'", "known:", "timm"],
        key="teacher.plugin",
    ),
    Case(
        "unknown-strategy-plugin",
        {"distillation": {"strategy": "tokn"}},
        ["unknown strategy plugin 'tokn'", "did you mean 'token'", "hard, none, soft, token"],
        key="distillation.strategy",
    ),
    Case(
        "unknown-dataset-plugin",
        {"data": {"dataset": "imagenet"}},
        ["unknown dataset plugin 'imagenet'", "imagefolder, synthetic"],
        key="data.dataset",
    ),
    Case(
        "unknown-augmentation-plugin",
        {"augmentation": {"plugin": "randaug"}},
        ["unknown augmentation plugin 'randaug'", "deit, simple, three_augment"],
        key="augmentation.plugin",
    ),
    Case(
        "unknown-plugin-show",
        {"distillation": {"strategy": "distill"}},
        ["unknown strategy plugin 'distill'", "known:"],
        key="distillation.strategy",
        command="show",
    ),
    Case(
        "unknown-augmentation-option",
        {"augmentation": {"mixupp": 0.5}},
        [
            "unknown option 'mixupp'",
            "augmentation plugin 'simple'",
            "did you mean 'mixup'",
            "it accepts:",
            "hflip",
            "padding",
            "smoothing",
            "crop_pct",
        ],
        key="augmentation.mixupp",
    ),
    Case(
        "unknown-strategy-option",
        {"distillation": {"strategy": "hard", "tau": 3.0}, "student": TINY_PLAIN},
        ["unknown option 'tau'", "strategy plugin 'hard'", "it accepts: alpha"],
        key="distillation.tau",
    ),
    Case(
        "unknown-dataset-option",
        {"data": {"dataset": "synthetic", "lenght": 64}},
        ["unknown option 'lenght'", "dataset plugin 'synthetic'", "did you mean 'length'"],
        key="data.lenght",
    ),
    Case(
        "dataset-takes-no-options",
        {"data": {"cache": True}},
        ["unknown option 'cache'", "dataset plugin 'imagefolder'", "no options"],
        key="data.cache",
    ),
    Case(
        "unknown-student-option-to-timm",
        {"student": {"depht": 2}},
        ["student plugin 'deit'", "failed", "depht"],
        key="student",
    ),
    Case(
        "token-needs-distilled-student",
        {"student": TINY_PLAIN},
        ["needs a student with a distillation token", "'deit_tiny_patch16_224' has none"],
        key="distillation.strategy",
    ),
    Case(
        "distilled-student-strategy-none",
        {"distillation": {"strategy": "none"}, "teacher": DELETE},
        ["has a distillation token", "strategy 'none' does not train", "token"],
        key="student.model",
    ),
    Case(
        "hard-without-teacher",
        {"distillation": {"strategy": "hard"}, "teacher": DELETE, "student": TINY_PLAIN},
        ["strategy 'hard' needs a teacher", "add a [teacher] section", 'strategy = "none"'],
        key="distillation.strategy",
    ),
    Case(
        "teacher-mean-2-values",
        {"teacher": {"mean": [0.5, 0.5]}},
        ["expected 3 values", "[0.5, 0.5]"],
        key="teacher.mean",
    ),
    Case("teacher-std-zero", {"teacher": {"std": [0.2, 0.0, 0.2]}}, ["every std must be positive"], key="teacher.std"),
    Case(
        "odd-batch-with-mixup",
        {"data": {"batch_size": 63}, "augmentation": {"plugin": "deit"}},
        ["batch_size must be even", "Mixup/CutMix", "63"],
        key="data.batch_size",
    ),
    Case(
        "num-classes-in-student",
        {"student": {"num_classes": 10}},
        ["'num_classes' is set by deitctl", "not in [student]", "set [data] num_classes instead"],
        key="student.num_classes",
    ),
    Case(
        "num-classes-in-teacher",
        {"teacher": {"num_classes": 100}},
        ["'num_classes' is set by deitctl", "set [data] num_classes instead"],
        key="teacher.num_classes",
    ),
    Case(
        "img-size-in-student", {"student": {"img_size": 64}}, ["'img_size' is set by deitctl"], key="student.img_size"
    ),
    # the timm teacher takes **options, so a typo reaches timm.create_model: the message still names it
    Case(
        "teacher-key-typo-to-timm",
        {"teacher": {"checkpont": "t.pt"}},
        ["unknown key 'checkpont'", "did you mean 'checkpoint'"],
        key="teacher.checkpont",
    ),
    Case(
        "strategy-alpha-out-of-range",
        {"distillation": {"alpha": 2.0}},
        ["strategy plugin 'token'", "alpha must be in [0, 1], got 2.0"],
        key="distillation",
    ),
    Case(
        "strategy-option-wrong-type",
        {"distillation": {"alpha": "half"}},
        ["expected a number", "'half'"],
        key="distillation.alpha",
    ),
    Case(
        "strategy-token-bad-target",
        {"distillation": {"target": "medium"}},
        ["target must be 'hard' or 'soft'", "'medium'"],
        key="distillation",
    ),
    Case("optimizer-betas", {"optimizer": {"betas": [0.9]}}, ["expected two numbers"], key="optimizer.betas"),
    Case(
        "missing-teacher-recipe",
        {"teacher": {"checkpoint": "absent/best.pt", "recipe": "absent_teacher.toml"}},
        ["no such teacher recipe", "absent_teacher.toml"],
        key="teacher.recipe",
    ),
    Case("set-bad-value", {}, ["must be positive"], key="data.batch_size", sets=["data.batch_size=0"]),
    Case(
        "set-unknown-key",
        {},
        ["unknown key 'epoch'", "did you mean 'epochs'"],
        key="run.epoch",
        sets=["run.epoch=3"],
        command="show",
    ),
    # --set problems are not in the file: the message names --set instead
    Case(
        "set-no-equals",
        {},
        ["--set expects KEY=VALUE", "'distillation.strategy'"],
        sets=["distillation.strategy"],
        names_file=False,
    ),
    Case(
        "set-empty-key-part",
        {},
        ["--set expects KEY=VALUE", "'run..epochs=3'"],
        sets=["run..epochs=3"],
        names_file=False,
    ),
    Case("set-into-scalar", {}, ["is not a table"], key="run.epochs.x", sets=["run.epochs.x=3"], names_file=False),
    # a message with "[/...]" in it must not crash the printer
    Case("markup-in-key", {"run": {"[/x]": 1}}, ["unknown key '[/x]'"], key="run.[/x]"),
    Case(
        "markup-in-value",
        {"run": {"precision": "[bold]fp8[/bold]"}},
        ["'[bold]fp8[/bold]' is not one of"],
        key="run.precision",
    ),
]

KEY_CASES = [c for c in CASES if c.key]


def _write_case(case: Case, tmp_path: Path) -> Path:
    path = tmp_path / f"{case.id}.toml"
    if case.recipe is None:
        return path
    text = case.recipe if isinstance(case.recipe, str) else make_recipe(case.recipe)
    path.write_text(text, encoding="utf-8")
    return path


def _run_case(case: Case, tmp_path: Path, monkeypatch) -> tuple[Path, Result]:
    monkeypatch.chdir(tmp_path)  # relative paths in the recipes (data root, teacher recipe) stay in tmp_path
    path = _write_case(case, tmp_path)
    args = ["recipe", case.command, str(path)]
    for s in case.sets:
        args += ["--set", s]
    return path, cli(*args)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_recipe(case: Case, tmp_path, monkeypatch):
    """Exit 2, one message naming the file and saying what is wrong, no traceback."""
    path, res = _run_case(case, tmp_path, monkeypatch)
    assert res.exception is None, f"uncaught {res.exception!r}"
    assert "Traceback" not in res.output
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: "), res.stderr
    assert sum(line.startswith("error:") for line in res.stderr.splitlines()) == 1, res.stderr
    if case.names_file:
        assert str(path) in res.stderr
    elif case.sets:
        assert "--set" in res.stderr
    for fragment in case.expect:
        assert fragment in res.stderr, f"{fragment!r} not in {res.stderr!r}"
    assert "ok" not in res.stdout.split()  # nothing claims success
    if case.command == "show":
        assert "[run]" not in res.stdout  # no half-resolved recipe printed


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KEY_CASES])
def test_bad_recipe_message_names_key(case: Case, tmp_path, monkeypatch):
    """The CLI message names the key as ``[section.key]``, next to the file."""
    path, res = _run_case(case, tmp_path, monkeypatch)
    assert res.exit_code == 2
    where = f"{path}: [{case.key}]" if case.names_file else f"[{case.key}]"
    assert where in res.stderr, res.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in KEY_CASES])
def test_bad_recipe_error_names_key(case: Case, tmp_path, monkeypatch):
    """The error deitctl raises (what the CLI prints) carries the file and the key."""
    from deitctl.recipe import load_recipe
    from deitctl.validate import validate

    monkeypatch.chdir(tmp_path)
    path = _write_case(case, tmp_path)
    with pytest.raises(UserError) as info:  # noqa: PT012 (validate runs only on a recipe that loads)
        recipe = load_recipe(path, case.sets)
        if case.command == "validate":
            validate(recipe)
    exc = info.value
    assert isinstance(exc, RecipeError)
    assert exc.key == case.key
    assert f"[{case.key}]" in str(exc)
    if case.names_file:
        assert exc.source == str(path)
        assert str(exc).startswith(f"{path}: [{case.key}]: ")


def test_recipe_is_a_directory(tmp_path):
    res = cli("recipe", "validate", str(tmp_path))
    assert res.exception is None and res.exit_code == 2
    assert str(tmp_path) in res.stderr and "not a file" in res.stderr


def test_bad_recipe_in_a_real_process(tmp_path):
    """``python -m deitctl``: exit 2, the message on stderr, nothing on stdout, no traceback."""
    path = tmp_path / "r.toml"
    path.write_text(make_recipe({"run": {"epoch": 5}}), encoding="utf-8")
    env = {**os.environ, "DEITCTL_DISABLE_PLUGIN_AUTOLOAD": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deitctl", "recipe", "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert str(path) in proc.stderr and "did you mean 'epochs'" in proc.stderr


def test_markup_in_message_real_process(tmp_path):
    """A key like ``"[/x]"`` must give the usual exit 2, not a rich MarkupError traceback (exit 1)."""
    path = tmp_path / "r.toml"
    path.write_text('[run]\n"[/x]" = 1\n', encoding="utf-8")
    env = {**os.environ, "DEITCTL_DISABLE_PLUGIN_AUTOLOAD": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deitctl", "recipe", "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2
    assert f"{path}: [run.[/x]]" in proc.stderr


# --------------------------------------------------------------------------- good recipes


def test_recipes_folder_is_not_empty():
    assert RECIPES, "no recipes/*.toml found"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_shipped_recipe_validates(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name data and teacher recipes relative to the project root
    res = cli("recipe", "validate", str(path.relative_to(REPO)))
    assert res.exception is None, repr(res.exception)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert "error:" not in res.stderr
    assert res.stdout.startswith("ok "), res.stdout


def _round_trip(path: Path, tmp_path: Path, *sets: str) -> tuple[str, dict]:
    args = ["recipe", "show", str(path)]
    for s in sets:
        args += ["--set", s]
    first = cli(*args)
    assert first.exception is None and first.exit_code == 0, first.output
    data = tomllib.loads(first.stdout)
    again = tmp_path / "resolved.toml"
    again.write_text(first.stdout, encoding="utf-8")
    second = cli("recipe", "show", str(again))
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert tomllib.loads(second.stdout) == data
    valid = cli("recipe", "validate", str(again))
    assert valid.exception is None and valid.exit_code == 0, valid.output
    return first.stdout, data


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_shipped_recipe_show_round_trips(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _, data = _round_trip(path.relative_to(REPO), tmp_path)
    original = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, values in original.items():  # the resolved recipe keeps every value the file sets
        for key, value in values.items():
            assert data[section][key] == value, f"[{section}] {key}"


def test_tiny_recipe_show_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe(), encoding="utf-8")
    _text, data = _round_trip(path, tmp_path)
    # defaults are filled in: every section, and the plugins' own options
    assert {"run", "data", "student", "teacher", "augmentation", "distillation", "optimizer", "schedule", "ema"} <= set(
        data
    )
    assert data["distillation"]["alpha"] == 0.5 and data["distillation"]["target"] == "hard"
    assert data["augmentation"]["smoothing"] == 0.1
    assert data["student"]["depth"] == 2 and data["teacher"]["channels"] == [32, 64, 128, 256]


@pytest.mark.parametrize("value", ['"hard"', "hard", "'hard'"], ids=["quoted", "bare", "single-quoted"])
def test_set_strategy_quoted_or_bare(value: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe({"student": TINY_PLAIN}), encoding="utf-8")
    sets = ["--set", f"distillation.strategy={value}"]
    show = cli("recipe", "show", str(path), *sets)
    assert show.exception is None and show.exit_code == 0, show.output
    data = tomllib.loads(show.stdout)
    assert data["distillation"]["strategy"] == "hard"
    assert data["distillation"]["alpha"] == 0.5  # the hard strategy's own default, not token's options
    assert "target" not in data["distillation"]
    valid = cli("recipe", "validate", str(path), *sets)
    assert valid.exception is None and valid.exit_code == 0, valid.output
    assert "strategy hard" in valid.stdout


def test_set_typed_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe(), encoding="utf-8")
    res = cli(
        "recipe",
        "show",
        str(path),
        "--set",
        "run.epochs=7",
        "--set",
        "optimizer.lr=1e-3",
        "--set",
        "teacher.mean=[0.5, 0.5, 0.5]",
        "-s",
        "ema.enabled=false",
        "-s",
        "run.name=other",
    )
    assert res.exit_code == 0, res.output
    data = tomllib.loads(res.stdout)
    assert data["run"]["epochs"] == 7 and data["optimizer"]["lr"] == 1e-3
    assert data["teacher"]["mean"] == [0.5, 0.5, 0.5]
    assert data["ema"]["enabled"] is False and data["run"]["name"] == "other"


def test_missing_data_root_warns_but_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    root = tmp_path / "no-such-data"
    path.write_text(make_recipe({"data": {"root": str(root)}}), encoding="utf-8")
    res = cli("recipe", "validate", str(path))
    assert res.exception is None, repr(res.exception)
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr
    assert str(root / "train") in res.stderr and "does not exist" in res.stderr
    assert "error:" not in res.stderr
    assert res.stdout.startswith(f"ok {path}")


def test_absent_teacher_checkpoint_warns_but_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe({"teacher": {"checkpoint": "teacher/best.pt"}}), encoding="utf-8")
    res = cli("recipe", "validate", str(path))
    assert res.exit_code == 0, res.output
    assert "teacher/best.pt" in res.stderr and "warning:" in res.stderr


def test_teacher_with_strategy_none_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe({"student": TINY_PLAIN, "distillation": {"strategy": "none"}}), encoding="utf-8")
    res = cli("recipe", "validate", str(path))
    assert res.exit_code == 0, res.output
    assert 'warning: [teacher] is set but distillation.strategy is "none"' in res.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(make_recipe({"run": {"device": "cuda"}}), encoding="utf-8")
    res = cli("recipe", "validate", str(path))
    assert res.exception is None and res.exit_code == 2, res.output
    assert f"{path}: [run.device]: no CUDA device" in res.stderr
