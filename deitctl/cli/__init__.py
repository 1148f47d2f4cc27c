"""The ``deitctl`` command line (typer + rich). Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys

from deitctl.cli import data, evaluate, export, teach, tools, train  # noqa: F401  (each module adds its commands)
from deitctl.cli.app import DEBUG_ENV, app

__all__ = ["app", "main"]


def _take_debug_flag(argv: list[str]) -> list[str]:
    """``--debug`` anywhere before ``--`` (``deitctl train R --debug``) turns debugging on."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    os.environ[DEBUG_ENV] = "1"
    return [a for a in argv[:end] if a != "--debug"] + argv[end:]


def main() -> None:
    """Entry point for ``deitctl`` and ``python -m deitctl``. ``kill -USR1 PID`` prints the
    Python stacks of a running deitctl to its stderr (a run that seems stuck says where)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    app(args=_take_debug_flag(sys.argv[1:]), prog_name="deitctl")
