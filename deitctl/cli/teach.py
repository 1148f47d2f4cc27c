"""``deitctl teach``."""

from __future__ import annotations

from pathlib import Path

import typer

from deitctl.cli.app import RecipeArgument, SetOption, Sets, app, err, handles_errors, load, out, say


@app.command()
@handles_errors
def teach(
    recipe: Path = RecipeArgument,
    cache: Path | None = typer.Option(
        None, "--cache", help="The cache folder (default: the recipe's [teacher] cache). Made when missing."
    ),
    sets: Sets = SetOption,
    epochs: str | None = typer.Option(
        None, "--epochs", metavar="A:B", help="Epochs to teach, counted from 1, both included (default: all)."
    ),
    world_size: int = typer.Option(
        0, "--world-size", min=0, help="Processes of the training that reads the cache (default: this launch's)."
    ),
    teacher_batch: int = typer.Option(
        0, "--teacher-batch", min=0, help="Images per teacher forward, whole steps (default: one step's batch)."
    ),
    full_max_classes: int = typer.Option(
        100, "--full-max-classes", min=1, help="Store every logit (fp32) up to this many classes."
    ),
    top_k: int = typer.Option(
        10,
        "--top-k",
        min=0,
        help="Above that: the argmax and the top-k logits (fp16); 0: the argmax alone (hard targets).",
    ),
    tail_tau: float = typer.Option(
        3.0,
        "--tail-tau",
        min=0.0,
        help="Top-k: the other logits get one value, their true total probability at this temperature "
        "(0: probability 0, softmax over the top k).",
    ),
    shard_steps: int = typer.Option(500, "--shard-steps", min=1, help="Steps of one process in one shard file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Write the teacher's outputs for the recipe's exact training stream into a cache.

    Students read it with ``[teacher] cache = "DIR"`` and train without running the teacher.
    One process replays the stream of any number of training processes (``--world-size``);
    under torchrun (``torchrun --nproc_per_node=N -m deitctl teach ...``) the processes share
    the work. Stopped, it continues where it stopped; epoch ranges taught apart combine.
    """
    from deitctl.distributed import init_from_env, shutdown
    from deitctl.errors import UserError
    from deitctl.progress import RichReporter
    from deitctl.run import ensure_teacher
    from deitctl.runtime import resolve_device
    from deitctl.teach import TeachOptions, describe, parse_epochs
    from deitctl.teach import teach as run_teach

    r = load(recipe, sets)
    folder = cache or (Path(r.teacher.cache) if r.teacher is not None and r.teacher.cache else None)
    if folder is None:
        raise UserError("deitctl teach: --cache DIR is needed (or [teacher] cache in the recipe)")
    options = TeachOptions(
        epochs=parse_epochs(epochs, r.run.epochs) if epochs else None,
        world_size=world_size,
        teacher_batch=teacher_batch,
        full_max_classes=full_max_classes,
        top_k=top_k,
        tail_tau=tail_tau,
        shard_steps=shard_steps,
    )
    world = init_from_env(resolve_device(r).type)
    talk = say if world.is_main and not quiet else (lambda message: None)
    try:
        for warning in r.warnings:
            talk(f"warning: {warning}")
        ensure_teacher(
            r,
            world=world,
            reporter=lambda rec: RichReporter(err, rec.run.progress, enabled=not quiet and world.is_main),
            say=talk,
        )
        result = run_teach(r, folder, options, world=world, log=talk)
    finally:
        shutdown()
    if world.is_main:
        out.print(describe(result))
