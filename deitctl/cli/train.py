"""``deitctl train``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from deitctl.cli.app import RecipeArgument, SetOption, Sets, app, err, handles_errors, load, out, say
from deitctl.errors import UserError


@app.command()
@handles_errors
def train(
    recipe: Path = RecipeArgument,
    sets: Sets = SetOption,
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override run.output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output directory (its last.pt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh over a run in the output directory."),
    auto_resume: bool = typer.Option(
        False,
        "--auto-resume",
        help="Continue the run in the output directory if there is one, else start (Slurm requeue, torchrun restarts).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a student (and its teacher first, when the recipe names a teacher recipe).

    A directory that holds a run is refused unless --resume, --overwrite or --auto-resume says
    what to do; one run per directory (a lock). Under torchrun (``torchrun --nproc_per_node=N
    -m deitctl train RECIPE``) every process trains its share with DistributedDataParallel.
    """
    from deitctl.distributed import init_from_env, shutdown
    from deitctl.progress import RichReporter
    from deitctl.run import Start, run_training
    from deitctl.runtime import resolve_device

    chosen = [
        flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--auto-resume", auto_resume)) if on
    ]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} exclude each other: pick one")
    start: Start = "resume" if resume else "overwrite" if overwrite else "auto" if auto_resume else "new"
    overrides = (sets or []) + ([f"run.output_dir={json.dumps(str(output_dir))}"] if output_dir else [])
    r = load(recipe, overrides)
    world = init_from_env(resolve_device(r).type)
    try:
        result = run_training(
            r,
            start=start,
            world=world,
            reporter=lambda rec: RichReporter(err, rec.run.progress, enabled=not quiet and world.is_main),
            say=say,
        )
    finally:
        shutdown()
    if not world.is_main:
        return
    final = result.last if "teacher_acc1" in result.last else None
    rows: list[tuple[str, str, float | None, float | None]] = [
        ("student", r.student.options.get("model", r.student.plugin), result.last.get("acc1"), result.best_acc1)
    ]
    if final is not None and r.teacher is not None:
        rows.insert(0, ("teacher", r.teacher.options.get("model", r.teacher.plugin), final["teacher_acc1"], None))
    table = Table(title=f"{r.run.name}: results on {r.data.val_split} ({result.last.get('epoch', 0)} epochs)")
    for col in ("role", "model", "last top-1", "best top-1"):
        table.add_column(col)
    for role, model, last, best in rows:
        table.add_row(
            role, str(model), f"{last:.2f}" if last is not None else "-", f"{best:.2f}" if best is not None else "-"
        )
    out.print(table)
    if final is not None:
        out.print(f"student-teacher agreement: {final['teacher_agreement']:.2f}%")
    out.print(f"checkpoints and metrics in {result.output_dir}")
