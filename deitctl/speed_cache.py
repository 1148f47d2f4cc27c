"""The cache of :mod:`deitctl.tuning`'s measurements: one file, ``speed.json`` in
:func:`cache_dir`, with an entry per (device model, torch version, threads, models, batch
shape, candidates), so that the next run with the same ones starts at once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.machine import device_name


def cache_dir() -> Path:
    """``DEITCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/deitctl``, else ``~/.cache/deitctl``."""
    if env := os.environ.get("DEITCTL_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deitctl"


def _signature(model: nn.Module | None) -> str:
    if model is None:
        return "none"
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}:{params}:{hashlib.sha256(repr(model).encode()).hexdigest()[:16]}"


# raise it when a candidate's kernels or the way they are timed change, so that measurements
# cached before are taken again
KERNELS_REVISION = 5


def cache_key(
    device: torch.device,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: tuple[int, ...],
    options: dict[str, list[Any]],
) -> str:
    """The entry of one (device model, torch version, threads, models, batch shape, candidates)."""
    fields = {
        "kernels": KERNELS_REVISION,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "student": _signature(student),
        "teacher": _signature(teacher),
        "batch": list(batch),
        "options": {k: [str(v) for v in vs] for k, vs in options.items()},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cache_file() -> Path:
    """The file of measured speed settings."""
    return cache_dir() / "speed.json"


def cached_rows(key: str) -> list[dict[str, Any]] | None:
    """The rows measured under ``key``, or ``None``."""
    try:
        entry = json.loads(cache_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry.get("rows") if isinstance(entry, dict) else None


def store_rows(key: str, rows: list[dict[str, Any]], about: dict[str, Any]) -> None:
    """Add an entry to the cache file (atomically; a cache that cannot be written is skipped)."""
    path = cache_file()
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"rows": rows, **about}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
