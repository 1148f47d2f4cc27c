"""The ``deitctl`` command line (typer + rich). Heavy imports happen inside commands."""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deitctl import __version__
from deitctl.errors import DeitctlError

app = typer.Typer(
    name="deitctl",
    help="Train and evaluate data-efficient image transformers (DeiT) with distillation from a teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Show or check a recipe.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

SetOption = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key (dotted, TOML value).")


def _version(value: bool) -> None:
    if value:
        out.print(f"deitctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Train and evaluate data-efficient image transformers (DeiT) with distillation from a teacher."""


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn deitctl errors into one message and an exit code, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeitctlError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _warn(messages: list[str]) -> None:
    for m in messages:
        err.print(f"[yellow]warning:[/] {escape(m)}", markup=True, highlight=False)


def _report_plugin_failures() -> None:
    from deitctl.registry import get_registry

    _warn([f"plugin {f.provider} failed to load: {f.error}" for f in get_registry().failures])


def _load(recipe: Path, sets: Optional[List[str]]):
    from deitctl.recipe import load_recipe

    r = load_recipe(recipe, sets or [])
    _report_plugin_failures()
    return r


# --------------------------------------------------------------------------- plugins


@app.command()
@handles_errors
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List every registered plugin: kind, name, provider and help."""
    from deitctl.registry import SINGULAR, get_registry

    registry = get_registry()
    rows = [{"kind": SINGULAR[p.kind], "name": p.name, "provider": p.provider, "help": p.help} for p in registry.all()]
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
    _report_plugin_failures()


# --------------------------------------------------------------------------- recipes


@recipe_app.command("show")
@handles_errors
def recipe_show(recipe: Path = typer.Argument(..., help="Recipe file (TOML)."), sets: Optional[List[str]] = SetOption) -> None:
    """Print the fully resolved recipe as TOML."""
    r = _load(recipe, sets)
    _warn(r.warnings)
    print(r.to_toml(), end="")


@recipe_app.command("validate")
@handles_errors
def recipe_validate(recipe: Path = typer.Argument(..., help="Recipe file (TOML)."), sets: Optional[List[str]] = SetOption) -> None:
    """Check a recipe: keys, types, plugins, options and combinations (exit code 2 on error)."""
    from deitctl.validate import validate

    r = _load(recipe, sets)
    _warn(validate(r))
    out.print(f"ok {recipe}: {r.student.options.get('model', r.student.plugin)} student, "
              f"strategy {r.distillation.strategy}" + (f", teacher {r.teacher.options.get('model', r.teacher.plugin)}" if r.teacher else ""))


# --------------------------------------------------------------------------- train


def run_training(recipe, *, resume: bool = False, quiet: bool = False, depth: int = 0, world=None):
    """Train a recipe, first training its teacher when the recipe says how."""
    from deitctl.distributed import World, barrier
    from deitctl.engine import Trainer, prepare_output_dir
    from deitctl.errors import RecipeError
    from deitctl.progress import RichReporter
    from deitctl.recipe import load_recipe
    from deitctl.validate import validate

    world = world or World()
    notes = validate(recipe)
    if world.is_main:
        _warn(notes)
    t = recipe.teacher
    if recipe.uses_teacher and t is not None and t.recipe and not Path(t.checkpoint).is_file():
        if depth > 2:
            raise RecipeError("teacher recipes nest too deeply", source=recipe.source, key="teacher.recipe")
        if world.is_main:
            err.print(f"[bold]training the teacher first[/]: {escape(t.recipe)} (no {escape(t.checkpoint)} yet)",
                      markup=True)
        teacher_result = run_training(load_recipe(t.recipe), quiet=quiet, depth=depth + 1, world=world)
        teacher_result.trainer.close()  # its data-loader workers are done
        teacher_result.trainer = None
        barrier()
        if not Path(t.checkpoint).is_file():
            raise RecipeError(
                f"the teacher recipe {t.recipe} ran into {teacher_result.output_dir} but {t.checkpoint} does not exist",
                source=recipe.source, key="teacher.checkpoint")
    if world.is_main:
        prepare_output_dir(recipe)
    barrier()
    reporter = RichReporter(err, recipe.run.progress, enabled=not quiet and world.is_main)
    trainer = Trainer(recipe, reporter, world=world)
    result = trainer.fit(resume=resume)
    barrier()
    result.trainer = trainer  # type: ignore[attr-defined]
    return result


@app.command()
@handles_errors
def train(
    recipe: Path = typer.Argument(..., help="Recipe file (TOML)."),
    sets: Optional[List[str]] = SetOption,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Override run.output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT_DIR/last.pt."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a student (and its teacher first, when the recipe names a teacher recipe).

    Under torchrun (``torchrun --nproc_per_node=N -m deitctl train RECIPE``) every
    process trains its share with DistributedDataParallel.
    """
    from deitctl.distributed import init_from_env, shutdown
    from deitctl.engine import resolve_device

    r = _load(recipe, (sets or []) + ([f"run.output_dir={json.dumps(str(output_dir))}"] if output_dir else []))
    world = init_from_env(resolve_device(r).type)
    try:
        result = run_training(r, resume=resume, quiet=quiet, world=world)
        final = result.last if "teacher_acc1" in result.last else None
        result.trainer.close()
    finally:
        shutdown()
    if not world.is_main:
        return
    rows = [("student", r.student.options.get("model", r.student.plugin), result.last.get("acc1"), result.best_acc1)]
    if final is not None:
        rows.insert(0, ("teacher", r.teacher.options.get("model", r.teacher.plugin), final["teacher_acc1"], None))
    table = Table(title=f"{r.run.name}: results on {r.data.val_split} ({result.last.get('epoch', 0)} epochs)")
    for col in ("role", "model", "last top-1", "best top-1"):
        table.add_column(col)
    for role, model, last, best in rows:
        table.add_row(role, str(model), f"{last:.2f}" if last is not None else "-", f"{best:.2f}" if best is not None else "-")
    out.print(table)
    if final is not None:
        out.print(f"student-teacher agreement: {final['teacher_agreement']:.2f}%")
    out.print(f"checkpoints and metrics in {result.output_dir}")


# --------------------------------------------------------------------------- eval / predict


@app.command("eval")
@handles_errors
def eval_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="A deitctl checkpoint, or official DeiT/timm weights with --model."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset root (overrides the checkpoint's recipe)."),
    model: Optional[str] = typer.Option(None, "--model", help="timm model name, for checkpoints that are not deitctl's."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (default: the recipe's val_split)."),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the EMA weights."),
    sets: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Evaluate a checkpoint: top-1, top-5, loss; each head of a distilled student; teacher agreement."""
    from deitctl.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(ckpt, data=data, model=model, split=split, ema=ema, overrides=sets or [],
                                  warn=lambda m: _warn([m]))
    if as_json:
        print(json.dumps(metrics))
        return
    table = Table(title=f"{ckpt} on {metrics['split']} ({metrics['images']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}" if key == "loss" else f"{value:.2f}")
    out.print(table)


@app.command()
@handles_errors
def predict(
    images: List[Path] = typer.Argument(..., help="Image files."),
    ckpt: Path = typer.Option(..., "--ckpt", help="A deitctl checkpoint."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classify images with a checkpoint: the top-k classes and probabilities."""
    from deitctl.inference import predict_images

    results = predict_images(ckpt, images, top_k=top_k, warn=lambda m: _warn([m]))
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


@app.command()
@handles_errors
def benchmark(
    recipe: Path = typer.Argument(..., help="Recipe file (TOML)."),
    sets: Optional[List[str]] = SetOption,
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps (training and evaluation)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure a recipe: training step, evaluation and data-loader images/s, teacher share, peak memory."""
    from deitctl.benchmark import results_table, run_benchmark

    r = _load(recipe, sets)
    _warn(r.warnings)
    result = run_benchmark(r, steps=steps, warmup=warmup, warn=lambda m: _warn([m]))
    if as_json:
        print(json.dumps(result))
        return
    out.print(results_table(result, r, steps=steps, warmup=warmup))


@app.command()
@handles_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Output directories of `deitctl train`."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (one object per run) instead of a table."),
) -> None:
    """Compare runs side by side: strategy, teacher, epochs, best and last top-1, top-5, teacher agreement, images/s."""
    from deitctl.compare import compare_runs, print_table

    rows = compare_runs(run_dirs)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_table(out, rows)


def main() -> None:
    """Entry point for ``deitctl`` and ``python -m deitctl``."""
    app(prog_name="deitctl")


if __name__ == "__main__":
    main()
