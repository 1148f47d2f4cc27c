"""``deitctl train`` without the terminal: claim the run directory, train the recipe's
teacher first when the recipe says how, then the run itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from deitctl.api import Logger
from deitctl.distributed import World, barrier, broadcast_object
from deitctl.errors import RecipeError, UserError
from deitctl.events import Reporter
from deitctl.recipe import Recipe, load_recipe
from deitctl.rundir import LAST, RunDir, RunLock
from deitctl.tracking import build_loggers, close_loggers, with_loggers
from deitctl.trainer import Trainer, TrainResult

MAX_TEACHER_DEPTH = 2
Start = Literal["new", "resume", "overwrite", "auto"]
"""How to treat a directory that holds a run: refuse it (``new``), continue it (``resume``),
replace it (``overwrite``), or continue it when there is one and start otherwise (``auto``)."""


def _silent(message: str) -> None:
    pass


def claim(recipe: Recipe, start: Start, say: Callable[[str], None] = _silent) -> tuple[RunLock, bool]:
    """Lock the run directory (one run per directory) and decide whether to resume.

    A directory that holds a run is refused unless ``start`` says what to do; a refusal
    changes nothing in it. Returns the held lock and whether to resume."""
    out = recipe.output_dir
    run_dir, lock = RunDir(out), RunLock(out)
    if out.is_dir() and (holder := lock.holder()):
        raise UserError(
            f"{out}: another deitctl run is using this directory ({holder}); "
            "wait for it to end, or give this run another --output-dir"
        )
    if start == "new" and out.is_dir() and run_dir.holds_run():
        raise _refusal(run_dir)
    RunDir.prepare(recipe)
    lock.acquire()
    try:
        holds = run_dir.holds_run()  # again, now that no one else can start here
        if start == "new" and holds:
            raise _refusal(run_dir)
        has_last = (run_dir / LAST).is_file()
        if start == "resume" and not has_last:
            raise UserError(f"{run_dir / LAST}: nothing to resume (no last.pt in the output directory)")
        if start == "overwrite" and holds:
            say(f"warning: --overwrite: starting afresh in {out}, replacing {', '.join(run_dir.existing_run())}")
            run_dir.clear()
        if start == "auto":
            say(f"--auto-resume: {'continuing the run' if has_last else 'no run to continue; starting'} in {out}")
    except BaseException:
        lock.release()
        raise
    return lock, start == "resume" or (start == "auto" and has_last)


def _refusal(run_dir: RunDir) -> UserError:
    found = ", ".join(run_dir.existing_run())
    return UserError(
        f"{run_dir.path} holds a run ({found}); nothing was changed. Continue it with --resume, "
        "start afresh with --overwrite (replaces those files), or use --auto-resume (continues a run "
        "when there is one, starts otherwise)"
    )


Loggers = list[tuple[str, Logger]]


def _claim_everywhere(
    recipe: Recipe, start: Start, world: World, say: Callable[[str], None]
) -> tuple[RunLock | None, bool, Loggers]:
    """Rank 0 builds the recipe's loggers (a missing package stops the run before the
    directory is touched) and claims the directory; every rank learns the decision, or the
    refusal. Returns the lock and the loggers (rank 0's) and whether to resume."""
    lock, resume, loggers, error = None, False, [], None
    if world.is_main:
        try:
            expected = start == "resume" or (start == "auto" and (recipe.output_dir / LAST).is_file())
            loggers = build_loggers(recipe, resume=expected)
            lock, resume = claim(recipe, start, say)
        except UserError as exc:
            close_loggers(loggers, say)
            error = exc
    message, resume = broadcast_object((str(error) if error else None, resume))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return lock, resume, loggers


def ensure_teacher(
    recipe: Recipe,
    *,
    world: World,
    reporter: Callable[[Recipe], Reporter] = lambda recipe: Reporter(),
    say: Callable[[str], None] = _silent,
    depth: int = 0,
) -> None:
    """When the recipe's teacher checkpoint does not exist and ``[teacher] recipe`` names a
    recipe that trains it, train it (continuing its run when one was interrupted)."""
    t = recipe.teacher
    if t is None or not t.recipe or Path(t.checkpoint).is_file():
        return
    if depth >= MAX_TEACHER_DEPTH:
        raise RecipeError("teacher recipes nest too deeply", source=recipe.source, key="teacher.recipe")
    if not Path(t.recipe).is_file():
        raise RecipeError(f"no such teacher recipe {t.recipe!r}", source=recipe.source, key="teacher.recipe")
    say(f"training the teacher first: {t.recipe} (no {t.checkpoint} yet)")
    teacher_run = run_training(
        load_recipe(t.recipe), start="auto", world=world, reporter=reporter, say=say, depth=depth + 1
    )
    barrier()
    if not Path(t.checkpoint).is_file():
        raise RecipeError(
            f"the teacher recipe {t.recipe} ran into {teacher_run.output_dir} but {t.checkpoint} does not exist",
            source=recipe.source,
            key="teacher.checkpoint",
        )


def run_training(
    recipe: Recipe,
    *,
    start: Start = "new",
    world: World | None = None,
    reporter: Callable[[Recipe], Reporter] = lambda recipe: Reporter(),
    say: Callable[[str], None] = _silent,
    depth: int = 0,
) -> TrainResult:
    """Train ``recipe`` in its run directory (see :func:`claim` for ``start``), its teacher
    first when needed. ``reporter`` makes each run's progress reporter; ``say`` receives the
    warnings and notes for the user (main process only)."""
    world = world or World()
    say = say if world.is_main else _silent
    for warning in recipe.warnings:
        say(f"warning: {warning}")
    lock, resume, loggers = _claim_everywhere(recipe, start, world, say)
    try:
        if loggers:
            say(f"loggers: {', '.join(name for name, _ in loggers)}")
        try:
            t = recipe.teacher
            if recipe.uses_teacher and t is not None and not t.cache:  # with a cache, no step needs the teacher
                ensure_teacher(recipe, world=world, reporter=reporter, say=say, depth=depth)
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
    finally:
        if lock is not None:
            lock.release()
