"""The ``webdataset`` dataset: shards written by ``deitctl data pack``, local or behind a URL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import deitctl
from deitctl.api import Register, open_shards


def webdataset(
    *,
    root: str,
    split: str,
    transform: Callable[[Any], Any] | None = None,
    stream: bool = False,
    shuffle_buffer: int = 1000,
) -> Any:
    """``root/manifest.json`` and ``root/<split>-NNNNNN.tar``. Local shards are read by index
    (exactly as the ImageFolder they were packed from); shards behind a URL (http, https,
    pipe:, ... as the webdataset package opens them), or local ones with ``stream = true``,
    are streamed, mixed by a shuffle buffer of ``shuffle_buffer`` images per loader worker."""
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
    return open_shards(root=root, split=split, transform=transform, stream=stream, shuffle_buffer=shuffle_buffer)


@deitctl.hookimpl
def register_datasets(register: Register) -> None:
    register("webdataset", webdataset, help="shards of `deitctl data pack`: local (by index) or streamed from a URL")
