"""Checkpoints: atomic writes, safe reads (tensors and plain data only)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deitctl.errors import RecipeError, UserError

if TYPE_CHECKING:
    from deitctl.recipe import Recipe

STATE_KEYS = ("model", "state_dict", "model_ema", "module")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, flush, fsync, then rename."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: refused: the file holds pickled objects beyond tensors and plain data, "
            f"which could run code when loaded ({first[:200]})"
        ) from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None


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
