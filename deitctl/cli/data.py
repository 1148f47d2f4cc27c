"""``deitctl data cifar10 | check | pack``: data for users."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    downloads = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )

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
