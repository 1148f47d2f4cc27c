"""Figures (matplotlib, the ``plot`` extra): runs side by side (``compare --plot``) and a
confusion matrix (``eval --confusion``). Drawn on matplotlib's Agg canvas, without pyplot,
so no window and no global state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deitctl.errors import UserError

if TYPE_CHECKING:
    import torch

CLASS_LABELS_UP_TO = 40  # more classes: no tick labels
COUNTS_UP_TO = 12  # more classes: no numbers in the cells


def require_matplotlib(option: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserError(f"{option} needs matplotlib: pip install 'deitctl[plot]' ({exc})") from None


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path, option: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{option} {path}: cannot write the figure ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(r["epoch"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and isinstance(r.get("epoch"), (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]], path: Path, *, title: str = "") -> Any:
    """Top-1 and training loss per epoch, one line per run (``(summary, metrics rows)`` pairs,
    as ``deitctl compare`` reads them), labelled by run and strategy. Returns the figure."""
    require_matplotlib("--plot")
    figure = _figure(11, 4.2)
    top1, loss = figure.subplots(1, 2)
    for summary, rows in runs:
        label = f"{summary['run']} ({summary['strategy']})"
        line = top1.plot(*_series(rows, "acc1"), marker="o", markersize=3, label=label)[0]
        loss.plot(*_series(rows, "train_loss"), marker="o", markersize=3, color=line.get_color(), label=label)
    top1.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    for axes in (top1, loss):
        axes.grid(alpha=0.3)
    top1.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    _save(figure, path, "--plot")
    return figure


def plot_confusion(matrix: torch.Tensor, classes: list[str], path: Path, *, title: str = "") -> Any:
    """The confusion matrix, each row (true class) as shares of its images."""
    require_matplotlib("--confusion")
    counts = matrix.double()
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = min(max(5.0, n * 0.45), 16.0)
    figure = _figure(size + 1.5, size)
    axes = figure.subplots()
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    axes.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    if n <= CLASS_LABELS_UP_TO:
        axes.set_xticks(range(n), classes, rotation=90)
        axes.set_yticks(range(n), classes)
    if n <= COUNTS_UP_TO:
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                color = "white" if shares[i, j] > 0.5 else "black"
                axes.text(j, i, str(value), ha="center", va="center", fontsize="small", color=color)
    _save(figure, path, "--confusion")
    return figure
