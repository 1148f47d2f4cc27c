"""The ``webdataset`` dataset: shards written by ``deitctl data pack``, local or behind a URL.

Its factory is :func:`deitctl.api.open_shards`: ``root`` (a folder or a URL), ``split``,
``transform``, and the options ``stream`` (stream local shards too) and ``shuffle_buffer``
(images per loader worker mixed by a streamed epoch).
"""

from __future__ import annotations

import deitctl
from deitctl.api import Register, open_shards


@deitctl.hookimpl
def register_datasets(register: Register) -> None:
    register("webdataset", open_shards, help="shards of `deitctl data pack`: local (by index) or streamed from a URL")
