"""Where weights come from: a file, timm's pretrained weights (``timm:MODEL.TAG``) or a URL.

Remote weights are downloaded once, with a progress bar, and cached: timm's through the
Hugging Face Hub (``HF_HOME`` / ``HF_HUB_CACHE``, ``~/.cache/huggingface`` by default; the
source timm itself uses), URLs into torch's hub cache (``TORCH_HOME``, ``~/.cache/torch/hub``,
as ``torch.hub.load_state_dict_from_url``). Either way the file is read as safely as a local
one: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from deitctl.checkpoint import extract_state_dict, load_file
from deitctl.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from deitctl.schema import TeacherSection

TIMM = "timm:"
URLS = ("http://", "https://", "file://")


def is_remote(source: str) -> bool:
    """``timm:MODEL.TAG`` or a URL (fetched and cached, not a path)."""
    return source.startswith(TIMM) or source.startswith(URLS)


def available(source: str) -> bool:
    """Weights that can be loaded: a remote source, or a file that exists."""
    return bool(source) and (is_remote(source) or Path(source).is_file())


def teacher_source(t: TeacherSection) -> str:
    """The teacher's weights: ``checkpoint`` when it can be loaded, else ``download`` when
    set, else ``checkpoint`` ('' for none; a missing file is reported when loading it)."""
    if available(t.checkpoint) or not t.download:
        return t.checkpoint
    return t.download


def timm_pretrained_cfg(name: str) -> Any:
    """timm's pretrained config for ``MODEL.TAG`` (no download), or a UserError."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as exc:
        raise UserError(
            f"{TIMM}{name}: timm has no such pretrained weights ({exc}); list them with "
            f"timm.list_pretrained('{name.split('.')[0]}*')"
        ) from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"{TIMM}{name}: timm knows no download for these weights")
    return cfg


def _fetch_timm(name: str) -> Any:
    from timm.models import load_state_dict_from_hf

    cfg = timm_pretrained_cfg(name)
    if not cfg.hf_hub_id:
        return _fetch_url(cfg.url)
    try:
        if cfg.hf_hub_filename:
            return load_state_dict_from_hf(cfg.hf_hub_id, filename=cfg.hf_hub_filename, weights_only=True)
        return load_state_dict_from_hf(cfg.hf_hub_id, weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{TIMM}{name}: could not fetch from the Hugging Face Hub ({cfg.hf_hub_id}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            + (f"; the same weights are at {cfg.url}" if cfg.url else "")
        ) from None


def _fetch_url(url: str) -> Any:
    import torch.hub

    name = os.path.basename(urlparse(url).path) or "weights"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        found = torch.hub.HASH_REGEX.search(name)  # official files name a hash prefix: checked
        try:
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=found.group(1) if found else None)
        except Exception as exc:
            raise UserError(f"{url}: could not download ({type(exc).__name__}: {str(exc)[:300]})") from None
    return load_file(cached)


def load_source(source: str) -> Any:
    """The contents of a weights source (a state dict, or a checkpoint holding one)."""
    if source.startswith(TIMM):
        return _fetch_timm(source[len(TIMM) :])
    if source.startswith(URLS):
        return _fetch_url(source)
    return load_file(source)


def load_into(model: nn.Module, source: str, *, what: str) -> None:
    """Load weights from ``source`` into ``model`` strictly, with a clear error on mismatch."""
    state = extract_state_dict(load_source(source), source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{source}: does not fit the {what}: {' '.join(str(exc).split())[:600]}") from None
