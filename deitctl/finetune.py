"""A student initialised from a checkpoint (fine-tuning, transfer): position and patch
embeddings resampled to the student's grid, tokens kept, heads of another class count dropped."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deitctl.checkpoint import extract_state_dict
from deitctl.errors import RecipeError
from deitctl.recipe import Recipe
from deitctl.weights import available, load_source

HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
DIST_KEYS = ("dist_token",)


def init_student(model: nn.Module, path: str, recipe: Recipe) -> list[str]:
    """Initialise a student from a checkpoint (fine-tuning, transfer): the
    position embedding is resampled (bicubic) to the student's patch grid,
    class and distillation tokens are kept, and heads whose class count
    differs are dropped and left freshly initialised. Returns notes."""
    if not available(path):
        raise RecipeError(f"no such file {path!r}", source=recipe.source, key="student.checkpoint")
    state = dict(extract_state_dict(load_source(path), path))
    own = model.state_dict()
    notes: list[str] = []
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = int(getattr(model, "num_prefix_tokens", 1))
        old_prefix = 1 + sum(k in state for k in DIST_KEYS) if "cls_token" in state else 0
        pos = state["pos_embed"]
        if old_prefix != prefix:  # a distillation token added or dropped: its position row too
            rows = [pos[:, :1]] * prefix if old_prefix else []
            pos = torch.cat([*rows, pos[:, old_prefix:]], dim=1) if old_prefix else pos
        grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr,arg-type]
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(grid), num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
        )
        notes.append(f"position embedding resampled to a {grid[0]}x{grid[1]} grid")
    if (
        "patch_embed.proj.weight" in state
        and "patch_embed.proj.weight" in own
        and state["patch_embed.proj.weight"].shape != own["patch_embed.proj.weight"].shape
    ):
        from timm.layers import resample_patch_embed

        state["patch_embed.proj.weight"] = resample_patch_embed(
            state["patch_embed.proj.weight"], list(own["patch_embed.proj.weight"].shape[-2:])
        )
        notes.append("patch embedding resampled")
    dropped = [k for k in state if k.startswith(HEAD_PREFIXES) and (k not in own or state[k].shape != own[k].shape)]
    for key in dropped:
        del state[key]
    if dropped:
        heads = ", ".join(sorted({k.split(".")[0] for k in dropped}))
        notes.append(f"classifier heads re-initialised for {len(_classes_of(own))} classes ({heads})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = [k for k in missing if k.startswith(HEAD_PREFIXES) or k in DIST_KEYS]
    if "dist_token" in missing and "cls_token" in state:
        with torch.no_grad():
            model.dist_token.copy_(state["cls_token"])  # type: ignore[operator]
        notes.append("distillation token initialised from the class token")
    unexpected = [k for k in unexpected if k not in DIST_KEYS]
    bad = [k for k in missing if k not in allowed_missing]
    if bad or unexpected:
        raise RecipeError(
            f"{path} does not fit the student: missing {bad[:5]}, unexpected {unexpected[:5]}",
            source=recipe.source,
            key="student.checkpoint",
        )
    if any(k in state for k in DIST_KEYS) and "dist_token" not in own:
        notes.append("distillation token dropped (the student has none)")
    return notes


def _classes_of(state: dict[str, Any]) -> list[int]:
    for key in ("head.bias", "fc.bias", "classifier.bias"):
        if key in state:
            return list(range(state[key].shape[0]))
    return []
