"""``deitctl data cifar10 | check | pack``: data for users."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from deitctl.cli.app import app, err, handles_errors, out

data_app = typer.Typer(help="Import, check and pack image datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """``bar(description, total)`` -> ``advance(n)``: rich bars on stderr (nothing when it is no terminal)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    def progress(*columns: Any) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )

    bars = progress(MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    downloads = progress(DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())

    def bar(description: str, total: int | None) -> Callable[[int], None]:
        progress = downloads if description.startswith("downloading") else bars
        progress.start()
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)

    try:
        yield bar
    finally:
        bars.stop()
        downloads.stop()


@data_app.command("cifar10")
@handles_errors
def cifar10(
    dest: Path = typer.Argument(..., help="Folder to write: DEST/train/<class>/ and DEST/test/<class>/ (PNG)."),
    archive: Path | None = typer.Option(
        None, "--from", help="cifar-10-python.tar.gz already on disk (default: download it, MD5-checked)."
    ),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="Keep the downloaded archive in DEST."),
) -> None:
    """Import CIFAR-10 from the official python archive as an ImageFolder of lossless PNGs."""
    from deitctl.cifar10 import import_cifar10

    with progress_bars() as bar:
        counts = import_cifar10(dest, archive=archive, keep_archive=keep_archive, progress=bar)
    if not counts:
        out.print(f"{dest} holds CIFAR-10 already (train/ and test/); nothing to do")
        return
    out.print(
        f"CIFAR-10 in {dest}: {counts['train']:,} training images in train/, {counts['test']:,} test images in "
        f'test/ (10 classes, PNG). Use data.root = {json.dumps(str(dest))}, val_split = "test".'
    )


@data_app.command("check")
@handles_errors
def check(
    root: Path = typer.Argument(..., help="An ImageFolder root (ROOT/<split>/<class>/<image>) or packed shards."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per problem, one a line."),
    workers: int = typer.Option(0, "--workers", "-j", min=0, help="Decoding processes (0: one per core)."),
    min_side: int = typer.Option(32, "--min-side", min=1, help="Images with a shorter side are reported as tiny."),
    train_split: str = typer.Option("train", "--train-split", help="The split training reads."),
    strict: bool = typer.Option(False, "--strict", help="Warnings fail the check too (exit 2)."),
) -> None:
    """Decode every image of every split; report unreadable files, empty class folders, classes
    in one split only (errors), and images the loader converts, tiny or huge ones (warnings).

    Exit 0 when no errors were found, 2 otherwise (with --strict: any problem)."""
    from rich.markup import escape

    from deitctl.datacheck import check as run_check

    with progress_bars() as bar:
        report = run_check(root, workers=workers, min_side=min_side, train_split=train_split, progress=bar)
    for p in report.problems:
        if as_json:
            print(json.dumps(p.as_dict()))
        else:
            colour = "red" if p.severity == "error" else "yellow"
            out.print(f"[{colour}]{p.severity}[/] {p.kind}: {escape(p.path)}: {escape(p.detail)}", markup=True)
    splits = ", ".join(f"{s} ({len(c)} classes)" for s, c in report.splits.items())
    err.print(
        f"{root}: {report.images:,} images in {splits}: {report.errors} errors, {report.warnings} warnings",
        highlight=False,
    )
    if report.errors or (strict and report.problems):
        raise typer.Exit(2)


@data_app.command("pack")
@handles_errors
def pack(
    root: Path = typer.Argument(..., help="An ImageFolder root: ROOT/<split>/<class>/<image>."),
    output: Path = typer.Argument(..., metavar="OUT", help="Folder for the shards and manifest.json."),
    shard_size: float = typer.Option(256.0, "--shard-size", min=0.001, help="Shard size in MB (about)."),
    max_side: int = typer.Option(
        0, "--max-side", min=0, help="Re-encode training images whose longer side exceeds N px to N px (0: never)."
    ),
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG quality of re-encoded images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the order of the samples in the shards."),
    workers: int = typer.Option(0, "--workers", "-j", min=0, help="Re-encoding processes (0: one per core)."),
    train_split: str = typer.Option("train", "--train-split", help="The split --max-side applies to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards packed into OUT before."),
) -> None:
    """Pack every split as WebDataset tar shards plus manifest.json, for `data.dataset = "webdataset"`."""
    from deitctl.pack import pack as run_pack

    with progress_bars() as bar:
        manifest = run_pack(
            root,
            output,
            shard_mb=shard_size,
            max_side=max_side,
            quality=quality,
            seed=seed,
            workers=workers,
            train_split=train_split,
            overwrite=overwrite,
            progress=bar,
        )
    for split, info in manifest["splits"].items():
        size = sum(s["bytes"] for s in info["shards"]) / 2**20
        resized = f", longer sides over {info['max_side']} px reduced" if info["max_side"] else ""
        out.print(
            f"{split}: {info['images']:,} images of {len(info['classes'])} classes in {len(info['shards'])} shards "
            f"({size:,.1f} MB){resized}"
        )
    out.print(f'{output / "manifest.json"} written; train with data.dataset = "webdataset", data.root = "{output}"')
