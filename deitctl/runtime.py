"""What one process runs on: the device, and the speed settings resolved for it (precision,
attention kernel, GELU backward, threads, host allocator)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from deitctl.errors import RecipeError
from deitctl.recipe import Recipe

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(recipe: Recipe) -> torch.device:
    """``run.device``; under torchrun a CUDA process takes the GPU of its ``LOCAL_RANK``."""
    spec = recipe.run.device
    if spec == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            'no CUDA device is available here (use "auto" or "cpu")', source=recipe.source, key="run.device"
        )
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(spec)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[object]]:
    """A context factory: autocast to the precision's dtype, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def resolve_precision(device: torch.device, precision: str) -> str:
    """For evaluation and prediction: ``auto`` → bf16 on GPUs that have it, else fp16;
    fp32 on CPU. (Training measures instead: :mod:`deitctl.tuning`.)"""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_attention(attention: str) -> str:
    """For evaluation and prediction: ``auto`` → ``fused`` (PyTorch's kernel)."""
    return "fused" if attention == "auto" else attention


def set_attention(model: nn.Module, attention: str) -> int:
    """Switch every timm attention block (``fused_attn``) in ``model``; returns how many.
    ``math`` runs timm's explicit path, and outside ``torch.compile`` DeiT's plain blocks take
    :func:`deitctl.attention.explicit_attention` (the same function, fewer passes); ``cpp``
    runs DeiT's plain blocks through :mod:`deitctl.attention_kernel` (fp32 on the CPU)."""
    from deitctl.attention import set_explicit_attention

    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            setattr(module, "fused_attn", attention == "fused")  # noqa: B010 (an attribute of timm's blocks)
            count += 1
    set_explicit_attention(model, attention == "math", kernel=attention == "cpp")
    return count


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, cap: int = 4) -> int:
    """Loader workers for evaluation and prediction: at most ``cap``, and never more than
    the usable cores (torch warns beyond that, and they would only compete)."""
    return max(0, min(requested, cap, usable_cpus()))


def set_threads(threads: int) -> None:
    """Intra-op threads for this process (0: leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when it took effect.

    By default glibc serves large blocks with ``mmap`` and returns them to the system on
    ``free``, and trims the heap's top; a training step on the CPU allocates and frees
    the same large activation buffers every step, so each step page-faults them in
    again (measured: 20,000–45,000 faults and 10–15 % of the CPU time of a compiled
    bf16 step). Serving every block from the heap and never trimming it keeps the
    process at its peak size instead. Other C libraries and systems: nothing is changed.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))


def release_freed_memory() -> bool:
    """Return the C library's free heap memory to the system now (glibc ``malloc_trim``)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def configure_process(threads: int, retain_host_memory: bool) -> bool:
    """Apply a recipe's per-process settings (``run.threads``, ``run.retain_host_memory``);
    True when freed host memory is now kept for reuse."""
    set_threads(threads)
    return retain_freed_memory() if retain_host_memory else False
