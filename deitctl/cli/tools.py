"""``deitctl plugins``, ``recipe show|validate``, ``benchmark`` and ``compare``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from deitctl.cli.app import (
    RecipeArgument,
    SetOption,
    Sets,
    app,
    err,
    handles_errors,
    load,
    out,
    report_plugin_failures,
    warn,
)

recipe_app = typer.Typer(help="Show or check a recipe.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@app.command()
@handles_errors
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List every registered plugin: kind, name, provider and help."""
    from deitctl.kinds import kind
    from deitctl.registry import get_registry

    registry = get_registry()
    rows = [
        {"kind": kind(p.kind).singular, "name": p.name, "provider": p.provider, "help": p.help} for p in registry.all()
    ]
    if as_json:
        failures = [{"provider": f.provider, "error": f.error} for f in registry.failures]
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return
    table = Table(title="deitctl plugins")
    for col in ("kind", "name", "provider", "help"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(row[c] for c in ("kind", "name", "provider", "help")))
    out.print(table)
    report_plugin_failures()


@recipe_app.command("show")
@handles_errors
def recipe_show(recipe: Path = RecipeArgument, sets: Sets = SetOption) -> None:
    """Print the fully resolved recipe as TOML."""
    r = load(recipe, sets)
    warn(r.warnings)
    print(r.to_toml(), end="")


@recipe_app.command("validate")
@handles_errors
def recipe_validate(recipe: Path = RecipeArgument, sets: Sets = SetOption) -> None:
    """Check a recipe: keys, types, plugins, options and combinations (exit code 2 on error)."""
    from deitctl.validate import validate

    r = load(recipe, sets)
    warn(validate(r))
    teacher = f", teacher {r.teacher.options.get('model', r.teacher.plugin)}" if r.teacher else ""
    out.print(
        f"ok {recipe}: {r.student.options.get('model', r.student.plugin)} student, "
        f"strategy {r.distillation.strategy}{teacher}"
    )


@app.command()
@handles_errors
def benchmark(
    recipe: Path = RecipeArgument,
    sets: Sets = SetOption,
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps (training and evaluation)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    tune: bool = typer.Option(
        False, "--tune", help='First time every speed candidate (as run.* = "auto" would) and print the table.'
    ),
) -> None:
    """Measure a recipe: training step, evaluation and data-loader images/s, teacher share, FLOPs and
    matmul utilization, peak memory; then say what bounds it (data, teacher or compute)."""
    from deitctl.benchmark import results_table, run_benchmark, tuning_table

    r = load(recipe, sets)
    warn(r.warnings)
    result = run_benchmark(r, steps=steps, warmup=warmup, tune=tune, warn=lambda m: warn([m]))
    if as_json:
        print(json.dumps(result))
        return
    if tune:
        out.print(tuning_table(result))
    out.print(results_table(result, r, steps=steps, warmup=warmup))
    out.print(result["verdict"])


@app.command()
@handles_errors
def compare(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Output directories of `deitctl train`."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (one object per run) instead of a table."),
    plot: Path | None = typer.Option(
        None, "--plot", metavar="FILE.png", help="Also draw top-1 and training loss per epoch of each run (matplotlib)."
    ),
) -> None:
    """Compare runs side by side: strategy, teacher, epochs, best and last top-1, top-5, teacher agreement, images/s."""
    from deitctl.compare import print_table, run_history

    histories = [run_history(p) for p in run_dirs]
    rows = [summary for summary, _ in histories]
    if plot is not None:
        from deitctl.plots import plot_runs

        plot_runs(histories, plot, title="top-1 and training loss per epoch")
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(out, rows)
    if plot is not None:
        err.print(f"wrote {plot}")
