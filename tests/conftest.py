"""Shared paths, fixtures and helpers for the test suite.

Tests import the helpers directly (``from conftest import ROOT, cli``): pytest puts this
folder on ``sys.path``. Tests marked ``slow`` (torchrun, SIGKILL loops, compile, benchmark
scripts) run by default too; ``python -m pytest -m "not slow"`` leaves them out for a
quick pass.

One intra-op thread per process (``OMP_NUM_THREADS=1`` unless the environment sets it):
the models are tiny, so threads only add synchronisation, and on a 2-core machine that
also runs data-loader workers, subprocesses or other jobs, spinning OpenMP threads make a
run up to ten times slower. The variable is set before torch is imported and is inherited
by every subprocess the tests start, so in-process and subprocess runs compute alike.
Tests of ``run.threads`` ask for a count other than the current one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from deitctl.cli import app

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before

ROOT = Path(__file__).resolve().parents[1]

# speed settings measured by run.* = "auto" are cached per machine; the tests keep their own
# cache (shared by every test and subprocess of the session), never the user's
if "DEITCTL_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DEITCTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="deitctl-test-cache-")
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


def torchrun_deitctl(processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run ... -m deitctl``: that many processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        "-m",
        "deitctl",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sample() -> Path:
    return SAMPLE


# --------------------------------------------------------------------------- tiny runs in subprocesses

TINY = HOSTILE / "tiny.toml"
"""The base recipe of the reliability tests: a 1-block DeiT on 32 px images, one epoch."""
PLUGIN_MODULE = "deitctl_hostile_plugins"
"""tests/hostile/deitctl_hostile_plugins.py, loaded with ``DEITCTL_PLUGINS``."""


@contextlib.contextmanager
def plugins_from_env():
    """DEITCTL_PLUGINS=deitctl_hostile_plugins in this process, on a fresh registry: what
    :func:`spawn`'s processes load, for in-process runs of the same recipe."""
    from deitctl.registry import reset_registry

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(HOSTILE))
        mp.setenv("DEITCTL_PLUGINS", PLUGIN_MODULE)
        reset_registry()
        try:
            yield
        finally:
            reset_registry()


def train_args(out: Path, *sets: str, root: Path = SAMPLE, resume: bool = False) -> list[str]:
    args = ["train", str(TINY), "--output-dir", str(out), "--set", f"data.root={json.dumps(str(root))}"]
    for item in sets:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DEITCTL_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HOSTILE), *filter(None, [env.get("PYTHONPATH")])])
    env["DEITCTL_PLUGINS"] = PLUGIN_MODULE
    env.update(extra)
    return env


def spawn(args: list[str], **env: str) -> subprocess.Popen:
    """``python -m deitctl ARGS`` in its own session (so that a signal to its group hits
    its data-loader workers too, and nothing else)."""
    return subprocess.Popen(
        [sys.executable, "-m", "deitctl", *args],
        cwd=ROOT,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Whatever happens in the block, the process and everything it started are gone after it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.communicate()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def _kill_tree(proc: subprocess.Popen, *, stacks: bool = False) -> None:
    """SIGKILL the process' group and every process below it; with ``stacks``, first ask each
    for its Python stacks (deitctl prints them on SIGUSR1), so a hang says where it was."""
    below = descendants(proc.pid)
    if stacks:
        for pid in [proc.pid, *below]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc, stacks=True)
        output, _ = proc.communicate()
        pytest.fail(f"deitctl did not finish in {timeout} s (the Python stacks of its processes are below):\n{output}")
    return proc.returncode, output


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"deitctl exited ({proc.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    try:
        return path.read_text(encoding="utf-8").count("\n")
    except FileNotFoundError:
        return 0


def epochs_in_metrics(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_ckpt(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(ckpt, dict) and ckpt["format"] == "deitctl-checkpoint-1", path
    for name, value in ckpt["model"].items():
        assert torch.isfinite(value).all(), f"{path}: {name} is not finite"
    return ckpt


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def copy_images(base: Path, split: str, cls: str, count: int, start: int = 0) -> Path:
    folder = base / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        shutil.copy(SAMPLE / split / cls / f"{i:04d}.jpg", folder / f"{i:04d}.jpg")
    return folder


SMALL_ROOT_SETS = ("data.train_per_class=0", "data.val_per_class=0", "data.batch_size=4")
"""Every image of a :func:`small_root`, in batches of 4: with 8 training images none is dropped."""


def small_root(base: Path, classes=("cat", "dog"), train: int = 4, val: int = 1) -> Path:
    """An ImageFolder tree of real CIFAR-10 images: train/<class>/*.jpg, val/<class>/*.jpg."""
    for cls in classes:
        copy_images(base, "train", cls, train)
        copy_images(base, "val", cls, val)
    return base
