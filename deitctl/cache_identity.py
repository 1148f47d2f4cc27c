"""What determines a teacher-output cache, keyed by the recipe keys that set it.

Everything that decides which images the teacher sees, in which order, augmented and mixed
how, and the teacher itself: the data (the training file list, split, per-class subset,
dataset options), the image size and the student's input normalisation, the augmentation
plugin and its options (Mixup/CutMix included), the seed, the batch size, the world size,
gradient accumulation, repeated augmentation, the precision, and the teacher (plugin,
options, normalisation, resolution, a sha256 of its weights). ``deitctl teach`` records it in
the manifest; training from the cache, or teaching more epochs into it, compares it key by key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.data import base_and_indices
from deitctl.errors import RecipeError
from deitctl.recipe import Recipe
from deitctl.teacher_cache import sha256_file
from deitctl.weights import is_remote, teacher_source

WORLD_SIZE = "world size"
NORMALIZATION = "student.normalization"
CHECKPOINT = "teacher.checkpoint"
NOT_COMPARED = {"path"}  # informative only: the same files may live elsewhere on another machine
TEACHER_PATHS = {"checkpoint", "download", "recipe", "cache"}

DISPLAY = {
    WORLD_SIZE: "the world size (processes under torchrun)",
    NORMALIZATION: "student.model (its input normalisation)",
    "data.root": "data.root (the training file list)",
    CHECKPOINT: "teacher.checkpoint (the weights' sha256)",
}


def files_digest(dataset: Any, root: str) -> dict[str, Any]:
    """The training images as the sampler sees them: count and a sha256 of each file's path
    (relative to ``root``) and size, in dataset order; a dataset without files (``samples``)
    by its length and targets."""
    base, indices = base_and_indices(dataset)
    samples = getattr(base, "samples", None)
    h = hashlib.sha256()
    if samples:
        for i in indices:
            path = str(samples[i][0])
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            h.update(f"{os.path.relpath(path, root)}\t{size}\n".encode())
    else:
        targets = getattr(dataset, "targets", None)
        h.update(json.dumps([len(dataset), list(map(int, targets)) if targets is not None else None]).encode())
    return {"path": str(root), "files": len(indices), "sha256": h.hexdigest()}


def state_sha256(model: nn.Module) -> str:
    """A sha256 of a module's weights (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stream_identity(
    recipe: Recipe,
    train_ds: Any,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    world_size: int,
    precision: str,
) -> dict[str, Any]:
    """What decides the teacher's input, step by step, in every process."""
    d, sections = recipe.data, recipe.to_dict()
    out: dict[str, Any] = {
        "run.seed": recipe.run.seed,
        "run.precision": precision,
        "data.dataset": d.dataset,
        "data.root": files_digest(train_ds, d.root),
        "data.train_split": d.train_split,
        "data.train_per_class": d.train_per_class,
        "data.img_size": d.img_size,
        "data.batch_size": d.batch_size,
        "data.repeated_aug": d.repeated_aug,
        "optimizer.accumulate": recipe.optimizer.accumulate,
        WORLD_SIZE: world_size,
        NORMALIZATION: {"mean": list(mean), "std": list(std)},
    }
    out.update({f"data.{k}": v for k, v in d.options.items()})
    out.update({f"augmentation.{k}": v for k, v in sections["augmentation"].items()})
    return _plain(out)


def teacher_identity(recipe: Recipe, *, state: str | None = None) -> dict[str, Any]:
    """The teacher: plugin, options, normalisation and resolution, and the sha256 of its
    checkpoint file (when it is here) and of its loaded weights (``state``, when known)."""
    t = recipe.teacher
    assert t is not None
    values = {k: v for k, v in recipe.to_dict()["teacher"].items() if k not in TEACHER_PATHS}
    out: dict[str, Any] = {f"teacher.{k}": v for k, v in values.items()}
    source = teacher_source(t)  # the checkpoint file, or the timm tag or URL it falls back to
    path = Path(source) if source and not is_remote(source) else None
    out[CHECKPOINT] = {
        "path": source,
        "sha256": sha256_file(path) if path is not None and path.is_file() else None,
        "state_sha256": state,
    }
    return _plain(out)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """As JSON holds it (tuples become lists), so that a value read back compares equal."""
    plain: dict[str, Any] = json.loads(json.dumps(data))
    return plain


def differences(cached: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ, each with both values, for a message. The teacher's
    weights are compared where both sides know their file's sha256."""
    out = []
    for key in sorted(set(cached) | set(now), key=_order):
        a, b = cached.get(key), now.get(key)
        if key == CHECKPOINT:
            a, b = a or {}, b or {}
            a_sha, b_sha = a.get("sha256"), b.get("sha256")
            a_path, b_path = str(a.get("path") or ""), str(b.get("path") or "")
            if a_sha and b_sha and a_sha != b_sha:
                out.append(
                    f"{DISPLAY[key]}: another file ({b.get('path')!r}, sha256 {b_sha[:12]}…, cache {a_sha[:12]}…)"
                )
            elif is_remote(a_path) and is_remote(b_path) and a_path != b_path:
                out.append(f"{DISPLAY[key]}: other weights (cache {a_path!r}, recipe {b_path!r})")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in NOT_COMPARED}
            b = {k: v for k, v in b.items() if k not in NOT_COMPARED}
        if a != b:
            now_is = "this run" if key == WORLD_SIZE else "recipe"
            out.append(f"{DISPLAY.get(key, key)}: cache {_show(a)}, {now_is} {_show(b)}")
    return out


def _order(key: str) -> tuple[int, str]:
    sections = ("run", "data", "student", "augmentation", "optimizer", "teacher")
    head = key.split(".")[0]
    return (sections.index(head) if head in sections else len(sections), key)


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, dict) and "files" in value:
        return f"{value['files']} files (sha256 {str(value.get('sha256'))[:12]}…)"
    return json.dumps(value)


def require_indexed(recipe: Recipe, dataset: Any) -> None:
    """A teacher cache replays the sampler's order, so its dataset must be read by index:
    streamed shards (a URL root, or ``stream = true``) are refused, naming the key."""
    from torch.utils.data import IterableDataset

    inner = getattr(dataset, "dataset", dataset)  # under the SeededDataset
    if isinstance(dataset, IterableDataset) or isinstance(inner, IterableDataset):
        raise RecipeError(
            "a teacher cache needs a training split read by index, to replay its exact order; streamed shards "
            "(a URL root, or stream = true) cannot be replayed: use local shards read by index, an ImageFolder, "
            "or the live teacher",
            source=recipe.source,
            key="teacher.cache" if recipe.teacher is not None and recipe.teacher.cache else "data.root",
        )
