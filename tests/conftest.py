"""Shared paths, fixtures and helpers for the test suite.

Tests import the helpers directly (``from conftest import ROOT, cli``): pytest puts this
folder on ``sys.path``. Tests marked ``slow`` (torchrun, SIGKILL loops, compile, benchmark
scripts) run by default too; ``python -m pytest -m "not slow"`` leaves them out for a
quick pass.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from deitctl.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10-sample"
"""6,000 real CIFAR-10 images shipped with the repository (train/ and val/)."""
RECIPES = ROOT / "recipes"
HOSTILE = Path(__file__).resolve().parent / "hostile"
"""tiny.toml, the reliability tests' base recipe, and plugins that fail on purpose."""

runner = CliRunner()


def invoke(*args: str) -> Result:
    """Run the CLI in-process; an unexpected exception (not an exit) propagates."""
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli(*args: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stdout + stderr)."""
    result = invoke(*args)
    return result.exit_code, result.output


def set_args(items: list[str] | tuple[str, ...]) -> list[str]:
    """``--set`` for each override."""
    return [arg for item in items for arg in ("--set", item)]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``, one dict per epoch."""
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sample() -> Path:
    return SAMPLE
