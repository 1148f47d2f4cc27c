"""``deitctl export``."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from deitctl.cli.app import app, handles_errors, out, warn


class Format(StrEnum):
    onnx = "onnx"
    timm = "timm"
    safetensors = "safetensors"


@app.command()
@handles_errors
def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="A deitctl checkpoint (best.pt, last.pt)."),
    fmt: Format = typer.Option(..., "--format", help="onnx, timm (safetensors for timm.create_model) or safetensors."),
    output: Path = typer.Option(..., "--output", "-o", help="The file to write."),
    ema: bool = typer.Option(False, "--ema", help="Export the EMA weights."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export the student for timm, ONNX Runtime or plain safetensors, checked against PyTorch."""
    from deitctl.export import export_checkpoint

    result = export_checkpoint(ckpt, fmt.value, output, ema=ema)
    warn(result.notes)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    out.print(f"wrote {', '.join(map(str, result.files))} ({result.format}, {result.num_classes} classes)")
    out.print(f"checked with {result.checked_with} on a batch: largest difference {result.max_abs_diff:.3g}")
    out.print(f"load it with: {result.load}")
