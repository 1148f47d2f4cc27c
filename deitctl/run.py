"""``deitctl train`` without the terminal: a recipe's teacher first when the recipe says how,
then the run itself, in its run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from deitctl.distributed import World, barrier
from deitctl.errors import RecipeError
from deitctl.events import Reporter
from deitctl.recipe import Recipe, load_recipe
from deitctl.rundir import RunDir
from deitctl.tracking import build_loggers, close_loggers, with_loggers
from deitctl.trainer import Trainer, TrainResult

MAX_TEACHER_DEPTH = 2


def _silent(message: str) -> None:
    pass


def run_training(
    recipe: Recipe,
    *,
    resume: bool = False,
    world: World | None = None,
    reporter: Callable[[Recipe], Reporter] = lambda recipe: Reporter(),
    say: Callable[[str], None] = _silent,
    depth: int = 0,
) -> TrainResult:
    """Train ``recipe``; when its teacher checkpoint does not exist and ``[teacher] recipe``
    names a recipe that trains it, train that first. ``reporter`` makes each run's progress
    reporter; ``say`` receives the warnings and notes for the user (main process only)."""
    world = world or World()
    say = say if world.is_main else _silent
    for warning in recipe.warnings:
        say(f"warning: {warning}")
    loggers = build_loggers(recipe, resume=resume) if world.is_main else []  # a missing package stops here
    if loggers:
        say(f"loggers: {', '.join(name for name, _ in loggers)}")
    try:
        _teacher_first(recipe, world, reporter, say, depth)
        if world.is_main:
            RunDir.prepare(recipe)
        barrier()
        trainer = Trainer(recipe, with_loggers(reporter(recipe), loggers, recipe, say), world=world)
    except BaseException:
        close_loggers(loggers, say)
        raise
    try:
        result = trainer.fit(resume=resume)
    finally:
        trainer.close()  # the loaders' workers are done
    barrier()
    return result


def _teacher_first(
    recipe: Recipe, world: World, reporter: Callable[[Recipe], Reporter], say: Callable[[str], None], depth: int
) -> None:
    """Train the teacher when its checkpoint does not exist and ``[teacher] recipe`` says how."""
    t = recipe.teacher
    if recipe.uses_teacher and t is not None and t.recipe and not Path(t.checkpoint).is_file():
        if depth >= MAX_TEACHER_DEPTH:
            raise RecipeError("teacher recipes nest too deeply", source=recipe.source, key="teacher.recipe")
        if not Path(t.recipe).is_file():
            raise RecipeError(f"no such teacher recipe {t.recipe!r}", source=recipe.source, key="teacher.recipe")
        say(f"training the teacher first: {t.recipe} (no {t.checkpoint} yet)")
        teacher_run = run_training(load_recipe(t.recipe), world=world, reporter=reporter, say=say, depth=depth + 1)
        barrier()
        if not Path(t.checkpoint).is_file():
            raise RecipeError(
                f"the teacher recipe {t.recipe} ran into {teacher_run.output_dir} but {t.checkpoint} does not exist",
                source=recipe.source,
                key="teacher.checkpoint",
            )
