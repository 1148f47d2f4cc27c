"""The worked third-party plugin (examples/deitctl-acme-teacher) and the plugin contract.

The example is made discoverable without pip and without touching the test
environment: its source folder goes on PYTHONPATH and a minimal
``deitctl_acme_teacher-0.1.0.dist-info`` (``METADATA`` + ``entry_points.txt``)
in a temporary folder gives ``importlib.metadata`` the entry point, exactly as an
installed distribution would. deitctl then runs in a subprocess (``python -m
deitctl``), so each check sees a fresh plugin registry. One extra test builds and
installs the real package with pip into a temporary ``--target`` (offline, no
build isolation) and is skipped when pip cannot do that here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE, cli

EXAMPLE = ROOT / "examples" / "deitctl-acme-teacher"
EXAMPLE_RECIPE = EXAMPLE / "recipe.toml"
ACME_PROVIDER = "deitctl-acme-teacher 0.1.0"
BUILTINS = {
    ("teacher", "timm"),
    ("student", "deit"),
    ("student", "timm"),
    ("augmentation", "deit"),
    ("strategy", "token"),
    ("strategy", "none"),
    ("dataset", "imagefolder"),
}
PLUGIN_ENV = ("DEITCTL_DISABLE_PLUGIN_AUTOLOAD", "DEITCTL_PLUGINS")
# "Not installed", even where someone did pip install the example: built-ins only.
WITHOUT_ACME = {"DEITCTL_DISABLE_PLUGIN_AUTOLOAD": "1"}


# --------------------------------------------------------------------------- helpers


def make_dist(where: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """A minimal installed-distribution record: what pip writes, less the files list."""
    info = where / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[deitctl]"] + [f"{ep} = {module}" for ep, module in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return where


def deitctl(*args: str, path: list[Path] = (), env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``python -m deitctl ARGS`` from the repository root with PATH on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    pythonpath = [str(p) for p in path]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    full_env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    full_env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "deitctl", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def plugins_json(*, path: list[Path] = (), env: dict[str, str] | None = None) -> dict:
    proc = deitctl("plugins", "--json", path=path, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def rows(listing: dict) -> dict[tuple[str, str], dict]:
    return {(p["kind"], p["name"]): p for p in listing["plugins"]}


def write_module(where: Path, name: str, source: str) -> None:
    (where / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture(scope="module")
def acme_path(tmp_path_factory) -> list[Path]:
    """PYTHONPATH entries that make deitctl-acme-teacher 0.1.0 'installed'."""
    site = make_dist(
        tmp_path_factory.mktemp("acme-site"), "deitctl-acme-teacher", "0.1.0", {"acme": "deitctl_acme_teacher"}
    )
    return [site, EXAMPLE]


# --------------------------------------------------------------------------- (a) discovery


def test_entry_point_lists_acme_cnn_with_its_distribution(acme_path):
    listing = plugins_json(path=acme_path)
    found = rows(listing)
    acme = found[("teacher", "acme-cnn")]
    assert acme["provider"] == ACME_PROVIDER
    assert acme["help"].startswith("ACME in-house CNN")
    assert found[("student", "acme-cnn")]["provider"] == ACME_PROVIDER
    assert set(found) >= BUILTINS
    assert all(found[b]["provider"].startswith("deitctl ") for b in BUILTINS)
    assert listing["failures"] == []


def test_plugins_table_shows_acme_cnn(acme_path):
    proc = deitctl("plugins", path=acme_path)
    assert proc.returncode == 0, proc.stderr
    assert "acme-cnn" in proc.stdout and "deitctl-acme-teacher" in proc.stdout
    assert "warning" not in proc.stderr


def test_pip_installs_the_example_and_deitctl_finds_it(tmp_path):
    """The real packaging: pyproject.toml builds, and its entry point is found."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    site = tmp_path / "site"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--disable-pip-version-check",
                "--quiet",
                "--target",
                str(site),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:  # pragma: no cover - environment
        pytest.skip(f"pip cannot install the example offline here: {exc}")
    if proc.returncode != 0:  # pragma: no cover - environment (no setuptools, no pip, ...)
        pytest.skip(f"pip cannot install the example offline here: {proc.stderr.strip()[-500:]}")
    (info,) = site.glob("deitctl_acme_teacher-0.1.0.dist-info")
    assert "acme = deitctl_acme_teacher" in (info / "entry_points.txt").read_text()
    found = rows(plugins_json(path=[site]))
    assert found[("teacher", "acme-cnn")]["provider"] == ACME_PROVIDER


# --------------------------------------------------------------------------- (b) the example recipe


def test_example_recipe_validates(acme_path):
    proc = deitctl("recipe", "validate", str(EXAMPLE_RECIPE), path=acme_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "acme-cnn" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_example_recipe_without_the_plugin_is_a_clear_error():
    proc = deitctl("recipe", "validate", str(EXAMPLE_RECIPE), env=WITHOUT_ACME)
    assert proc.returncode == 2
    assert "teacher.plugin" in proc.stderr and "unknown teacher plugin 'acme-cnn'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipe_show_fills_in_the_factory_defaults(acme_path, tmp_path):
    recipe = tmp_path / "acme.toml"
    text = EXAMPLE_RECIPE.read_text(encoding="utf-8").replace("width = 32", "").replace("depth = 3\n", "\n", 1)
    recipe.write_text(text, encoding="utf-8")
    assert "width" not in tomllib.loads(text)["teacher"]
    proc = deitctl("recipe", "show", str(recipe), "--set", "teacher.depth=4", path=acme_path)
    assert proc.returncode == 0, proc.stderr
    teacher = tomllib.loads(proc.stdout)["teacher"]
    assert teacher["plugin"] == "acme-cnn"
    assert teacher["width"] == 32 and teacher["depth"] == 4
    assert teacher["checkpoint"] == "runs/acme_teacher/best.pt"


# --------------------------------------------------------------------------- (c) autoload off


def test_disable_autoload_hides_third_party_but_keeps_builtins(acme_path):
    found = rows(plugins_json(path=acme_path, env={"DEITCTL_DISABLE_PLUGIN_AUTOLOAD": "1"}))
    assert not any(p["provider"] == ACME_PROVIDER for p in found.values())
    assert ("teacher", "acme-cnn") not in found
    assert set(found) >= BUILTINS


def test_deitctl_plugins_env_loads_a_module_that_is_not_installed():
    # Not installed (no dist-info), autoload off: DEITCTL_PLUGINS still loads it.
    env = {"DEITCTL_PLUGINS": "deitctl_acme_teacher", "DEITCTL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    listing = plugins_json(path=[EXAMPLE], env=env)
    found = rows(listing)
    assert found[("teacher", "acme-cnn")]["provider"] == "deitctl_acme_teacher"
    assert set(found) >= BUILTINS
    assert listing["failures"] == []


# --------------------------------------------------------------------------- (d) a broken plugin


BROKEN_PLUGINS = {
    "missing-dependency": (
        """
        import deitctl
        import acme_sdk_that_is_not_installed  # the real cause

        @deitctl.hookimpl
        def register_teachers(register):
            register("broken", lambda *, num_classes: None)
        """,
        ["ModuleNotFoundError", "acme_sdk_that_is_not_installed"],
    ),
    "import-error": (
        """
        raise ImportError("libacme.so.3: cannot open shared object file")
        """,
        ["ImportError", "libacme.so.3: cannot open shared object file"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_work(acme_path, tmp_path, case):
    source, cause = BROKEN_PLUGINS[case]
    write_module(tmp_path, "deitctl_broken_plugin", source)
    make_dist(tmp_path, "deitctl-broken", "0.3.0", {"broken": "deitctl_broken_plugin"})
    path = [tmp_path, *acme_path]

    proc = deitctl("plugins", "--json", path=path)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    (failure,) = listing["failures"]
    assert "deitctl-broken 0.3.0" in failure["provider"]
    assert "deitctl_broken_plugin" in failure["provider"]
    assert all(c in failure["error"] for c in cause), failure
    found = rows(listing)
    assert set(found) >= BUILTINS
    assert found[("teacher", "acme-cnn")]["provider"] == ACME_PROVIDER

    table = deitctl("plugins", path=path)
    assert table.returncode == 0
    assert "acme-cnn" in table.stdout
    assert "deitctl-broken 0.3.0" in table.stderr and cause[-1] in table.stderr
    assert "Traceback" not in table.stderr

    # A recipe that does not need the broken plugin still validates (with the warning).
    proc = deitctl("recipe", "validate", str(EXAMPLE_RECIPE), path=path)
    assert proc.returncode == 0, proc.stderr
    assert "deitctl-broken 0.3.0" in proc.stderr


# --------------------------------------------------------------------------- (e) name clash


CLONE = """
    import deitctl

    def clone(*, num_classes: int):
        raise AssertionError("never built")

    @deitctl.hookimpl
    def register_teachers(register):
        register({name!r}, clone, help="a clone")
"""


@pytest.mark.parametrize(
    "name, other",
    [("acme-cnn", ACME_PROVIDER), ("timm", "deitctl 0.1.0")],
    ids=["third-party-vs-third-party", "third-party-vs-builtin"],
)
def test_two_providers_of_one_teacher_name_is_an_error_naming_both(acme_path, tmp_path, name, other):
    write_module(tmp_path, "deitctl_acme_clone", CLONE.format(name=name))
    make_dist(tmp_path, "deitctl-acme-clone", "0.2.0", {"clone": "deitctl_acme_clone"})
    path = [tmp_path, *acme_path]
    for args in (("plugins", "--json"), ("plugins",), ("recipe", "validate", str(EXAMPLE_RECIPE))):
        proc = deitctl(*args, path=path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "deitctl-acme-clone 0.2.0" in proc.stderr and other in proc.stderr, proc.stderr
        assert repr(name) in proc.stderr
        assert "Traceback" not in proc.stderr


def test_one_name_in_two_kinds_is_not_a_clash(acme_path):
    # The example registers "acme-cnn" as a teacher and as a student.
    found = rows(plugins_json(path=acme_path))
    assert {("teacher", "acme-cnn"), ("student", "acme-cnn")} <= set(found)


# --------------------------------------------------------------------------- (f) options


def test_unknown_option_lists_the_accepted_ones(acme_path, tmp_path):
    recipe = tmp_path / "acme_typo.toml"
    recipe.write_text(
        EXAMPLE_RECIPE.read_text(encoding="utf-8").replace("width = 32", 'colour = "red"'), encoding="utf-8"
    )
    proc = deitctl("recipe", "validate", str(recipe), path=acme_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert str(recipe) in err and "teacher.colour" in err
    assert "unknown option 'colour'" in err and "acme-cnn" in err and ACME_PROVIDER in err
    assert "accepts: width, depth" in err
    assert "Traceback" not in err


def test_misspelt_option_gets_a_suggestion(acme_path):
    proc = deitctl("recipe", "validate", str(EXAMPLE_RECIPE), "--set", "teacher.widht=64", path=acme_path)
    assert proc.returncode == 2
    assert "teacher.widht" in proc.stderr and "did you mean 'width'" in proc.stderr
    assert "width, depth" in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ('teacher.width="wide"', "expected an integer"),
        ("teacher.depth=0", "depth must be positive, got 0"),
        ("teacher.num_classes=10", "set by deitctl"),
    ],
)
def test_bad_option_values_are_recipe_errors(acme_path, override, message):
    proc = deitctl("recipe", "validate", str(EXAMPLE_RECIPE), "--set", override, path=acme_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "[teacher" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- (g) building the teacher


@pytest.fixture
def acme_in_process(monkeypatch):
    """The example loaded in this process through DEITCTL_PLUGINS, on a fresh registry."""
    from deitctl.registry import reset_registry

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("DEITCTL_PLUGINS", "deitctl_acme_teacher")
    monkeypatch.setenv("DEITCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
    reset_registry()
    yield
    reset_registry()


def test_build_teacher_gives_logits_of_shape_batch_by_classes(acme_in_process, tmp_path):
    import torch
    from deitctl_acme_teacher import acme_cnn
    from deitctl_acme_teacher.model import AcmeCNN

    from deitctl.factories import IMAGENET_MEAN, IMAGENET_STD, build_teacher
    from deitctl.recipe import load_recipe
    from deitctl.teacher import FrozenTeacher

    torch.manual_seed(0)
    reference = acme_cnn(num_classes=10, width=8, depth=2).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so loading is visible
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "acme.pt"
    torch.save({"model": reference.state_dict(), "epoch": 3}, ckpt)

    recipe = load_recipe(
        EXAMPLE_RECIPE, ["teacher.width=8", "teacher.depth=2", f"teacher.checkpoint={json.dumps(str(ckpt))}"]
    )
    teacher = build_teacher(recipe, 10, IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(teacher, FrozenTeacher) and isinstance(teacher.model, AcmeCNN)
    assert teacher.model.head.in_features == 16  # width 8, two stages
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    x = torch.randn(4, 3, 32, 32)
    logits = teacher(x)
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all() and not logits.requires_grad
    with torch.no_grad():
        assert torch.allclose(logits, reference(x), atol=1e-5)

    # Handled by deitctl for every teacher: input_size resizes, mean/std re-normalise.
    recipe = load_recipe(
        EXAMPLE_RECIPE,
        [
            "teacher.input_size=64",
            'teacher.checkpoint=""',
            "teacher.mean=[0.5, 0.5, 0.5]",
            "teacher.std=[0.25, 0.25, 0.25]",
        ],
    )
    teacher = build_teacher(recipe, 7, IMAGENET_MEAN, IMAGENET_STD)
    assert teacher.input_size == 64 and teacher.renormalize
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_the_example_factory_on_its_own():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import torch
        from deitctl_acme_teacher import acme_cnn
    finally:
        sys.path.remove(str(EXAMPLE))
    for size in (1, 32, 57):
        model = acme_cnn(num_classes=3, depth=4).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
    with pytest.raises(ValueError, match="width must be positive"):
        acme_cnn(num_classes=3, width=0)


# --------------------------------------------------------------------------- a student distilled from acme-cnn


TINY_RUN = [
    "--set",
    f"data.root={json.dumps(str(SAMPLE))}",
    "--set",
    "data.train_per_class=2",
    "--set",
    "data.val_per_class=1",
    "--set",
    "data.batch_size=10",
    "--set",
    "data.num_workers=0",
    "--set",
    "run.epochs=1",
    "--set",
    "schedule.warmup_epochs=0",
    "--set",
    "run.progress=none",
    "--set",
    "run.device=cpu",
    "--set",
    "student.depth=1",
    "--set",
    "student.embed_dim=32",
    "--set",
    "teacher.width=8",
    "--set",
    "teacher.depth=1",
    "--set",
    'teacher.checkpoint=""',
]


@pytest.fixture(scope="module")
def distilled_from_acme(acme_path, tmp_path_factory) -> Path:
    """A student trained one tiny epoch with the acme-cnn teacher (untrained here), found
    through its entry point as in :func:`deitctl`'s subprocesses, but in this process (to
    save a start-up) on a fresh registry; the checks below run in subprocesses."""
    from deitctl.registry import reset_registry

    if not SAMPLE.is_dir():
        pytest.skip(f"no {SAMPLE}")
    out = tmp_path_factory.mktemp("acme-student")
    with pytest.MonkeyPatch.context() as mp:
        for entry in reversed(acme_path):
            mp.syspath_prepend(str(entry))
        for name in PLUGIN_ENV:
            mp.delenv(name, raising=False)
        reset_registry()
        try:
            code, output = cli("train", str(EXAMPLE_RECIPE), *TINY_RUN, "--output-dir", str(out), "--quiet")
        finally:
            reset_registry()
    assert code == 0, output[-3000:]
    return out / "best.pt"


def test_train_and_eval_with_the_acme_teacher(acme_path, distilled_from_acme):
    proc = deitctl("eval", "--ckpt", str(distilled_from_acme), "--json", path=acme_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["images"] == 10 and "teacher_agreement" in metrics and "acc1_dist" in metrics


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_distilled_student_does_not_need_its_teacher_plugin(distilled_from_acme, command):
    image = next(iter(sorted((SAMPLE / "val" / "cat").glob("*.jpg"))))
    args = (
        ["eval", "--ckpt", str(distilled_from_acme), "--json"]
        if command == "eval"
        else ["predict", str(image), "--ckpt", str(distilled_from_acme), "--json"]
    )
    proc = deitctl(*args, env=WITHOUT_ACME)  # the plugin is not installed here
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if command == "eval":
        assert result["images"] == 10 and "acc1" in result and "teacher_agreement" not in result
    else:
        assert result[0]["top"]


# --------------------------------------------------------------------------- loading one plugin twice


def test_an_installed_plugin_also_in_deitctl_plugins_loads_once_without_failure(acme_path):
    listing = plugins_json(path=acme_path, env={"DEITCTL_PLUGINS": "deitctl_acme_teacher"})
    assert rows(listing)[("teacher", "acme-cnn")]["provider"] == ACME_PROVIDER
    assert listing["failures"] == []


# --------------------------------------------------------------------------- [student] checkpoint


def test_student_checkpoint_initialises_a_plugin_student(acme_in_process, tmp_path):
    import torch
    from deitctl_acme_teacher import acme_cnn

    from deitctl.recipe import recipe_from_text
    from deitctl.trainer import Trainer

    if not SAMPLE.is_dir():
        pytest.skip(f"no {SAMPLE}")
    weights = acme_cnn(num_classes=10, width=8, depth=1)
    torch.nn.init.constant_(weights.head.weight, 0.125)
    torch.save(weights.state_dict(), tmp_path / "student.pt")
    recipe = recipe_from_text(
        textwrap.dedent(f"""
        [run]
        epochs = 1
        device = "cpu"
        progress = "none"
        output_dir = {json.dumps(str(tmp_path / "run"))}
        [data]
        root = {json.dumps(str(SAMPLE))}
        img_size = 32
        batch_size = 10
        num_workers = 0
        repeated_aug = 1
        train_per_class = 2
        val_per_class = 1
        [student]
        plugin = "acme-cnn"
        width = 8
        depth = 1
        checkpoint = {json.dumps(str(tmp_path / "student.pt"))}
        [augmentation]
        plugin = "simple"
        [distillation]
        strategy = "none"
        [ema]
        enabled = false
        """),
        "student-checkpoint.toml",
    )
    trainer = Trainer(recipe)
    assert torch.equal(trainer.student.head.weight.detach().cpu(), weights.head.weight.detach())
