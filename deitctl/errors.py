"""Errors that the CLI turns into one clear message and an exit code."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_text(text: str) -> str:
    """``text`` without terminal escape codes (some libraries put them in their messages)."""
    return _ANSI.sub("", text)


class DeitctlError(Exception):
    """Base class: a message for the user, and the exit code it maps to."""

    exit_code = 1


class UserError(DeitctlError):
    """Bad input: usage, recipe, data, checkpoint or plugin name (exit code 2)."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe problem, located by file and dotted key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.detail = source, key, message
        where = ": ".join(p for p in (source, f"[{key}]" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(UserError):
    """A plugin that cannot be loaded, registered or used."""


class RunError(DeitctlError):
    """A run that failed (for example a non-finite loss): exit code 1."""

    exit_code = 1
