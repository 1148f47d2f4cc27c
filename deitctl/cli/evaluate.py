"""``deitctl eval`` and ``deitctl predict``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from deitctl.cli.app import SetOption, Sets, app, handles_errors, out, warn


@app.command("eval")
@handles_errors
def eval_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A deitctl checkpoint, or official DeiT/timm weights with --model."),
    data: list[Path] | None = typer.Option(
        None, "--data", help="Dataset root (overrides the checkpoint's recipe); repeat to evaluate on several sets."
    ),
    labels: list[Path] | None = typer.Option(
        None,
        "--labels",
        metavar="FILE.json",
        help="Multi-label ground truth in the ImageNet-ReaL format (reports real_acc1); one per --data.",
    ),
    confusion: Path | None = typer.Option(
        None, "--confusion", metavar="FILE.png", help="Draw the confusion matrix (numbered per set with several)."
    ),
    model: str | None = typer.Option(None, "--model", help="timm model name, for checkpoints that are not deitctl's."),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate (default: the recipe's val_split)."),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the EMA weights."),
    sets: Sets = SetOption,
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per set (one line each), with per-class top-1."
    ),
) -> None:
    """Evaluate a checkpoint: top-1, top-5, loss; each head of a distilled student; teacher agreement;
    ReaL top-1 with --labels; per-class top-1 (--json) and the confusion matrix (--confusion)."""
    from deitctl.inference import evaluate_sets

    results = evaluate_sets(
        ckpt,
        data=data or [],
        labels=labels or [],
        confusion=confusion,
        model=model,
        split=split,
        ema=ema,
        overrides=sets or [],
        warn=lambda m: warn([m]),
    )
    for metrics in results:
        if as_json:
            print(json.dumps(metrics))
            continue
        table = Table(title=f"{ckpt} on {metrics['data']} {metrics['split']} ({metrics['images']} images)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            if isinstance(value, float):
                table.add_row(key, f"{value:.4f}" if key == "loss" else f"{value:.2f}")
        out.print(table)
        if "confusion" in metrics:
            out.print(f"confusion matrix: {metrics['confusion']}")


@app.command()
@handles_errors
def predict(
    images: list[Path] = typer.Argument(..., help="Image files."),
    ckpt: Path = typer.Option(..., "--ckpt", help="A deitctl checkpoint."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classify images with a checkpoint: the top-k classes and probabilities."""
    from deitctl.inference import predict_images

    results = predict_images(ckpt, images, top_k=top_k, warn=lambda m: warn([m]))
    if as_json:
        print(json.dumps(results))
        return
    for item in results:
        table = Table(title=item["image"])
        table.add_column("class")
        table.add_column("probability", justify="right")
        for row in item["top"]:
            table.add_row(row["class"], f"{row['probability']:.4f}")
        out.print(table)
