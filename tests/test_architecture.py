"""The code's shape: imports go one way (CLI → run → assembly → registry), and no module
grows past about 450 lines. ``deitctl.api``, what plugins build on, sits with assembly: it
hands plugins the data readers and batch transforms that assembly uses too."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

# The layers, top to bottom. A module may import its own layer and the layers below it.
LAYERS: dict[str, set[str]] = {
    "cli": {"cli", "__main__"},
    "run": {
        "run",
        "trainer",
        "train_state",
        "rundir",
        "optim",
        "inference",
        "validate",
        "benchmark",
        "compare",
        "progress",
        "evaluation",
        "events",
        "teach",
        "teacher_source",
        "tracking",
        "export",
        "plots",
    },
    "assembly": {
        "assembly",
        "factories",
        "weights",
        "finetune",
        "data",
        "samplers",
        "image_cache",
        "teacher",
        "runtime",
        "activations",
        "attention",
        "attention_kernel",
        "checkpoint",
        "distributed",
        "rng",
        "teacher_cache",
        "cache_identity",
        "api",
        "images",
        "batches",
        "shards",
        "streaming",
        "datacheck",
        "pack",
        "cifar10",
        "tuning",
        "speed_cache",
        "machine",
        "compiler",
    },
    "registry": {"registry", "kinds", "hookspecs", "recipe", "schema", "tomlio", "errors", "__init__"},
}
ORDER = list(LAYERS)
MAX_LINES = 450


def _modules() -> list[tuple[str, ast.Module]]:
    found = []
    for path in sorted((ROOT / "deitctl").rglob("*.py")):
        rel = path.relative_to(ROOT / "deitctl").with_suffix("")
        found.append((rel.parts[0], ast.parse(path.read_text(encoding="utf-8"))))
    return found


def _layer(module: str) -> str:
    for name, members in LAYERS.items():
        if module in members:
            return name
    raise AssertionError(f"deitctl/{module}: not in a layer of tests/test_architecture.py; place it there")


def _imports(tree: ast.Module) -> set[str]:
    """The deitctl modules ``tree`` imports (at any depth, lazily or not)."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "deitctl" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_every_module_belongs_to_a_layer():
    for module, _ in _modules():
        _layer(module)


def test_imports_go_one_way():
    wrong = []
    for module, tree in _modules():
        here = ORDER.index(_layer(module))
        for imported in _imports(tree):
            if imported in {m for members in LAYERS.values() for m in members} and ORDER.index(_layer(imported)) < here:
                wrong.append(f"deitctl/{module} ({ORDER[here]}) imports deitctl.{imported} ({_layer(imported)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", ["deitctl", "plugins"])
def test_no_module_is_over_450_lines(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long
