"""The run directory: what a run leaves on disk (README, "Output directory"), written so
that a killed process never leaves a broken run.

``last.pt`` is the commit point. Each epoch appends its line to ``metrics.jsonl``, then
writes ``best.pt`` (when it improved) and ``last.pt``, each atomically; ``--resume`` redoes
whatever followed the last commit, dropping its metrics lines.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

import torch

from deitctl import __version__
from deitctl.checkpoint import load_file, save_checkpoint
from deitctl.errors import RecipeError, RunError, UserError
from deitctl.recipe import Recipe

CHECKPOINT_FORMAT = "deitctl-checkpoint-1"
LAST, BEST, METRICS, RECIPE, LOCK = "last.pt", "best.pt", "metrics.jsonl", "recipe.toml", ".deitctl.lock"
LOCK_WAIT_S = 5.0  # a restarted group's new process may find the old one still exiting
RESTART_LOCK_WAIT_S = 15.0  # after torchrun restarted the group: the old process' loader workers
# share the lock's descriptor and notice their parent's death only within 5 s


def _strip_compile(state: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def checkpoint_payload(
    *,
    model: dict[str, Any],
    model_ema: dict[str, Any] | None,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any],
    epoch: int,
    num_updates: int,
    best_acc1: float,
    metrics: dict[str, Any],
    rng: dict[str, Any],
    recipe: Recipe,
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    """A checkpoint: tensors and plain data only (loadable with ``weights_only=True``).
    ``epoch`` is the last finished epoch (-1: none)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "deitctl_version": __version__,
        "model": _strip_compile(model),
        "model_ema": _strip_compile(model_ema) if model_ema is not None else {},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "epoch": epoch,
        "num_updates": num_updates,
        "best_acc1": best_acc1,
        "metrics": metrics,
        "rng": rng,
        "recipe": recipe.to_toml(),
        "classes": list(classes),
        "normalization": {"mean": list(mean), "std": list(std)},
        "img_size": recipe.data.img_size,
    }


class RunLock:
    """One run per directory: an exclusive ``flock`` on ``OUTPUT_DIR/.deitctl.lock``, which
    the OS releases when the process ends, however it ends (a dead holder never blocks). The
    file names the holder (host, pid, start time); it is left in place after the run."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self._file: IO[str] | None = None

    @staticmethod
    def _try_lock(f: IO[str]) -> bool:
        import fcntl

        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def holder(self, wait_s: float = 0.0) -> str | None:
        """Who holds the lock now (``host H, pid P, since T``), or None; changes nothing."""
        if not self.path.exists():
            return None
        deadline = time.monotonic() + wait_s
        with open(self.path, encoding="utf-8") as f:
            while not self._try_lock(f):
                if time.monotonic() >= deadline:
                    return self._describe(f)
                time.sleep(0.2)
        return None

    @staticmethod
    def _describe(f: IO[str]) -> str:
        f.seek(0)
        try:
            info = json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            info = {}
        since = info.get("started", "?")
        return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {since}"

    def acquire(self, wait_s: float | None = None) -> None:
        """Take the lock or raise a :class:`UserError` naming the holder."""
        if wait_s is None:
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            wait_s = RESTART_LOCK_WAIT_S if restarted else LOCK_WAIT_S
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run's life)
        deadline = time.monotonic() + wait_s
        while not self._try_lock(f):
            if time.monotonic() >= deadline:
                holder = self._describe(f)
                f.close()
                raise UserError(
                    f"{self.path.parent}: another deitctl run is using this directory ({holder}); "
                    "wait for it to end, or give this run another --output-dir"
                )
            time.sleep(0.2)
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


class RunDir:
    """One run's output directory. Only the main process (``is_main``) writes."""

    def __init__(self, path: Path, *, is_main: bool = True) -> None:
        self.path, self.is_main = Path(path), is_main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def prepare(recipe: Recipe) -> RunDir:
        """Make ``run.output_dir`` and check that it can be written."""
        out = recipe.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RecipeError(
                f"cannot write to output directory {str(out)!r}: {exc.strerror or exc}",
                source=recipe.source,
                key="run.output_dir",
            ) from exc
        return RunDir(out)

    def existing_run(self) -> list[str]:
        """What of a run the directory holds (``last.pt (epoch 3)``, ...); empty when none."""
        found = []
        for name in (LAST, BEST):
            if (self / name).is_file():
                written = time.strftime("%Y-%m-%d %H:%M", time.localtime((self / name).stat().st_mtime))
                found.append(f"{name} (written {written})")
        if (self / METRICS).is_file():
            lines = [line for line in (self / METRICS).read_text(encoding="utf-8").splitlines() if line.strip()]
            found.append(f"{METRICS} ({len(lines)} epoch{'s' if len(lines) != 1 else ''})")
        return found

    def holds_run(self) -> bool:
        """A run lives here: ``last.pt`` or ``metrics.jsonl``."""
        return (self / LAST).is_file() or (self / METRICS).is_file()

    def clear(self) -> None:
        """Remove a previous run's checkpoints and metrics (``--overwrite``)."""
        for name in (LAST, BEST, METRICS):
            (self / name).unlink(missing_ok=True)

    def last_checkpoint(self) -> dict[str, Any]:
        """``last.pt``, to resume from."""
        last = self / LAST
        if not last.exists():
            raise UserError(f"{last}: nothing to resume (no last.pt in the output directory)")
        ckpt: dict[str, Any] = load_file(last)
        return ckpt

    def begin(self, recipe: Recipe, *, resume_epoch: int | None) -> None:
        """Start or continue the run: keep the metrics of finished epochs (none for a fresh
        start), remove temporary files of a killed run, write the resolved recipe."""
        if not self.is_main:
            return
        metrics = self / METRICS
        if resume_epoch is None:
            metrics.unlink(missing_ok=True)
        elif metrics.exists():
            keep = [
                line
                for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= resume_epoch
            ]
            metrics.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        for stale in self.path.glob(".*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
        (self / RECIPE).write_text(recipe.to_toml(), encoding="utf-8")

    def save(self, state: dict[str, Any], name: str) -> None:
        """Save atomically; never over a good checkpoint with non-finite weights."""
        path = self / name
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RunError(
                f"the weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                f"not saved, the last good checkpoint is kept in {path}"
            )
        existed = path.exists()
        try:
            save_checkpoint(state, path)
        except OSError as exc:
            kept = f"the previous {name} is intact" if existed else f"no {name} was written"
            raise RunError(f"could not write {path}: {exc.strerror or exc}; {kept}") from exc

    def commit_epoch(self, metrics: dict[str, Any], state: dict[str, Any], *, improved: bool) -> None:
        """An epoch's metrics line, ``best.pt`` when it improved, then ``last.pt``."""
        if not self.is_main:
            return
        with open(self / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if improved:
            self.save(state, BEST)
        self.save(state, LAST)

    def commit_partial(self, state: dict[str, Any]) -> None:
        """``last.pt`` in the middle of an epoch (a stop request): the state carries where."""
        if self.is_main:
            self.save(state, LAST)
