"""Checkpoints: atomic writes, safe reads (tensors and plain data only)."""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from deitctl.errors import RecipeError, UserError, plain_text

if TYPE_CHECKING:
    from deitctl.recipe import Recipe

STATE_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")
SAFE_TYPES: tuple[type, ...] = (argparse.Namespace,)
"""Types allowed in a checkpoint beyond tensors and plain data: the official DeiT and timm
training scripts store their command-line ``args`` (an ``argparse.Namespace``)."""
STRIP_PREFIXES = ("module.", "_orig_mod.")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file in the same folder, flush, fsync, then rename: the file
    at ``path`` is either the old one or the whole new one, never a part (also when the disk
    fills up or the process is killed: the temporary file is removed, or left with a name no
    reader takes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda f: torch.save(payload, f))


def load_file(path: str | Path) -> Any:
    """Read a checkpoint or weights file safely (``weights_only=True`` or safetensors)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with torch.serialization.safe_globals(list(SAFE_TYPES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = plain_text(str(exc)).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(
            f"{path}: refused: the file holds pickled objects beyond tensors and plain data, "
            f"which could run code when loaded ({first[:200]})"
        ) from exc
    except Exception as exc:
        detail = plain_text(str(exc))[:200]
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {detail})") from exc


def extract_state_dict(obj: Any, path: str | Path, prefer: tuple[str, ...] = STATE_KEYS) -> dict[str, Any]:
    """The model weights in a plain state dict, or one under ``model``,
    ``state_dict``, ``model_ema`` (official DeiT, timm, deitctl files)."""
    import torch

    if isinstance(obj, dict):
        for key in prefer:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: no model weights found (expected a state dict, or one under {', '.join(prefer)})")
    out = {}
    for key, value in obj.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def recipe_of_checkpoint(ckpt: dict[str, Any], path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a deitctl checkpoint carries; a teacher whose plugin is not installed
    here is dropped with a warning (using the student does not need it)."""
    from deitctl.recipe import check_plugins, recipe_from_text

    text = ckpt.get("recipe")
    if not isinstance(text, str):
        raise UserError(f"{path}: not a deitctl checkpoint (no recipe inside); pass --model and --data")
    recipe = recipe_from_text(text, f"{path} (embedded recipe)", overrides, plugins=False)
    recipe.run.loggers = []  # using a checkpoint logs nothing: its trackers need not be installed
    try:
        check_plugins(recipe)
    except RecipeError as exc:
        if recipe.teacher is None or not (exc.key or "").startswith("teacher"):
            raise
        recipe.warnings.append(f"teacher left out: {exc.detail}")
        recipe.teacher = None
        check_plugins(recipe)
    return recipe
