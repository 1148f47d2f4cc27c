"""The typer application, its consoles, and the error handling every command shares.

A :class:`~deitctl.errors.DeitctlError` becomes one message and its exit code, never a
traceback; ``DEITCTL_DEBUG=1`` (or ``--debug``) prints the full traceback too, the
frames of the plugin or library that raised included.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from deitctl import __version__
from deitctl.errors import DeitctlError, plain_text

if TYPE_CHECKING:
    from deitctl.recipe import Recipe

F = TypeVar("F", bound=Callable[..., Any])
DEBUG_ENV = "DEITCTL_DEBUG"

app = typer.Typer(
    name="deitctl",
    help="Train and evaluate data-efficient image transformers (DeiT) with distillation from a teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

SetOption = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key (dotted, TOML value).")
RecipeArgument = typer.Argument(..., help="Recipe file (TOML).")
Sets = list[str] | None


def _version(value: bool) -> None:
    if value:
        out.print(f"deitctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of an error (or set {DEBUG_ENV}=1)."),
) -> None:
    """Train and evaluate data-efficient image transformers (DeiT) with distillation from a teacher."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def full_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` and of every exception behind it, shown even where the
    message was raised ``from None`` for users."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__
    return "".join(traceback.format_exception(exc))


def handles_errors(fn: F) -> F:
    """Turn deitctl errors into one message and an exit code, never a traceback (but on request)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeitctlError as exc:
            if debugging():
                err.print(full_traceback(exc), end="", markup=False)
            err.print(f"[bold red]error:[/] {escape(plain_text(str(exc)))}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def warn(messages: list[str]) -> None:
    for m in messages:
        err.print(f"[yellow]warning:[/] {escape(m)}", markup=True, highlight=False)


def say(message: str) -> None:
    """A note or (``warning: ...``) a warning for the user, on stderr."""
    if message.startswith("warning: "):
        warn([message[len("warning: ") :]])
    else:
        err.print(message)


def report_plugin_failures() -> None:
    from deitctl.registry import get_registry

    warn([f"plugin {f.provider} failed to load: {f.error}" for f in get_registry().failures])


def load(recipe: Path, sets: Sets) -> Recipe:
    """Read a recipe with its ``--set`` overrides; report plugins that failed to load."""
    from deitctl.recipe import load_recipe

    r = load_recipe(recipe, sets or [])
    report_plugin_failures()
    return r
