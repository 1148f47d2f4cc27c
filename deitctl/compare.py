"""``deitctl compare``: finished (or running) runs side by side, as in the paper's Table 3.

A run directory is what ``deitctl train`` writes (README, "Output directory"; :mod:`deitctl.rundir`):
``recipe.toml`` (the resolved recipe), ``metrics.jsonl`` (one object per epoch),
``last.pt`` and ``best.pt``. Everything shown comes from ``recipe.toml`` and
``metrics.jsonl``; a checkpoint is read (``weights_only=True``) only when one of them
is missing or empty, for the recipe and metrics it carries. Nothing is evaluated.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deitctl.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

CHECKPOINTS = ("last.pt", "best.pt")
COLUMNS = (
    ("run", "run"),
    ("recipe", "recipe"),
    ("strategy", "strategy"),
    ("teacher", "teacher"),
    ("epochs", "epochs"),
    ("best_acc1", "best top-1"),
    ("last_acc1", "last top-1"),
    ("acc5", "top-5"),
    ("teacher_agreement", "agreement"),
    ("images_per_s", "images/s"),
)
NOT_A_RUN = (
    "not a deitctl run directory (a run holds recipe.toml and metrics.jsonl, "
    "written by `deitctl train` into its output directory)"
)


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A deitctl checkpoint's plain data (recipe text, metrics), or None."""
    from deitctl.checkpoint import load_file

    for name in CHECKPOINTS:
        file = path / name
        if file.is_file():
            ckpt = load_file(file)  # weights_only=True; a bad file is a UserError naming it
            if isinstance(ckpt, dict) and isinstance(ckpt.get("recipe"), str):
                return ckpt
    return None


def _read_metrics(file: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: cannot read ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{file}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    for row in reversed(rows):
        if _number(row.get(key)) is not None:
            return row[key]
    return None


def read_run(path: Path) -> dict[str, Any]:
    """One run's summary: plain data, ready for JSON."""
    return run_history(path)[0]


def run_history(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run's summary and its metrics, one row per epoch."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: {'no such directory' if not path.exists() else NOT_A_RUN}")
    recipe_file, metrics_file = path / "recipe.toml", path / "metrics.jsonl"
    ckpt: dict[str, Any] | None = None
    if recipe_file.is_file():
        try:
            recipe = tomllib.loads(recipe_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{recipe_file}: not a readable recipe ({exc})") from None
        source = "recipe.toml"
    else:
        ckpt = _read_checkpoint(path) if metrics_file.is_file() else None
        if ckpt is None:
            raise UserError(f"{path}: {NOT_A_RUN}")
        try:
            recipe = tomllib.loads(ckpt["recipe"])
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: the recipe inside its checkpoint is not TOML ({exc})") from None
        source = "checkpoint"
    if not isinstance(recipe.get("run"), dict):
        raise UserError(f"{path}: {NOT_A_RUN} ({recipe_file.name} has no [run] section)")
    rows = _read_metrics(metrics_file) if metrics_file.is_file() else []
    if not rows:  # metrics.jsonl missing or empty: the checkpoint's last metrics, if any
        ckpt = ckpt if ckpt is not None else _read_checkpoint(path)
        if ckpt is not None and isinstance(ckpt.get("metrics"), dict) and ckpt["metrics"]:
            rows = [dict(ckpt["metrics"])]
            rows[0].setdefault("epoch", int(ckpt.get("epoch", -1)) + 1)
            source += "+checkpoint"

    run, distillation = recipe["run"], recipe.get("distillation") or {}
    teacher, student = recipe.get("teacher") or {}, recipe.get("student") or {}
    strategy = str(distillation.get("strategy", "none"))
    evaluated = [r for r in rows if _number(r.get("acc1")) is not None]
    best = max(evaluated, key=lambda r: float(r["acc1"]), default=None)
    best_acc1 = _number(rows[-1].get("best_acc1")) if rows else None
    if best is not None and (best_acc1 is None or best_acc1 < 0):
        best_acc1 = float(best["acc1"])
    if best_acc1 is not None and best_acc1 < 0:
        best_acc1 = None
    speeds = [float(r["images_per_s"]) for r in rows if _number(r.get("images_per_s")) is not None]
    epochs_done = int(rows[-1].get("epoch", len(rows))) if rows else 0
    summary: dict[str, Any] = {
        "run": path.resolve().name if path.name in ("", ".", "..") else path.name,
        "path": str(path),
        "recipe": str(run.get("name", "")),
        "strategy": strategy,
        "student": str(student.get("model", student.get("plugin", ""))),
        "teacher": (str(teacher.get("model", teacher.get("plugin", ""))) if teacher and strategy != "none" else None),
        "epochs": epochs_done,
        "epochs_planned": int(run.get("epochs", epochs_done) or 0),
        "best_acc1": best_acc1,
        "best_epoch": int(best["epoch"]) if best is not None and "epoch" in best else None,
        "last_acc1": _last(rows, "acc1"),
        "acc5": _last(rows, "acc5"),
        "acc1_cls": _last(rows, "acc1_cls"),
        "acc1_dist": _last(rows, "acc1_dist"),
        "acc1_ema": _last(rows, "acc1_ema"),
        "teacher_acc1": _last(rows, "teacher_acc1"),
        "teacher_agreement": _last(rows, "teacher_agreement"),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "train_time_s": sum(float(r["epoch_time_s"]) for r in rows if _number(r.get("epoch_time_s")) is not None)
        or None,
        "source": source,
    }
    summary["complete"] = bool(rows) and epochs_done >= summary["epochs_planned"]
    return summary, rows


def compare_runs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Summaries of every run, in the order given; the first path that is not a run
    is a UserError (exit code 2) naming it."""
    return [read_run(Path(p)) for p in paths]


def _cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if key == "epochs":
        done, planned = row["epochs"], row["epochs_planned"]
        return str(done) if done == planned else f"{done}/{planned}"
    if value is None or value == "":
        return "-"
    if key == "images_per_s":
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render_table(rows: list[dict[str, Any]]) -> Table:
    """A rich table: one row per run."""
    from rich.table import Table

    table = Table(
        title=f"{len(rows)} run{'s' if len(rows) != 1 else ''} (top-1, top-5 and agreement in %, "
        "on each run's validation split)"
    )
    for key, header in COLUMNS:
        numeric = key in ("epochs", "best_acc1", "last_acc1", "acc5", "teacher_agreement", "images_per_s")
        table.add_column(header, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_cell(key, row) for key, _ in COLUMNS))
    return table


def print_table(console: Console, rows: list[dict[str, Any]]) -> None:
    """Print the table at its natural width, even where the console is narrower
    (a pipe, CI): cells are never cut to an ellipsis."""
    from rich.measure import Measurement

    table = render_table(rows)
    natural = Measurement.get(console, console.options.update(width=10_000), table).maximum
    width = console.width
    console.width = max(width, natural)  # print(width=) can only narrow
    try:
        console.print(table)
    finally:
        console.width = width
