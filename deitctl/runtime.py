"""Speed settings resolved for one process: precision, attention kernel, threads."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX); Linux only."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → bf16 where the hardware has it, fp16 on older GPUs, fp32 on other CPUs."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def resolve_attention(device: torch.device, precision: str, attention: str) -> str:
    """``auto`` → ``math`` for bf16/fp16 on CPU, ``fused`` otherwise.

    On CPU, the backward of PyTorch's fused (flash) attention kernel is several times
    slower in bf16 than explicit matmuls plus softmax, which do run on bf16 units:
    ``benchmarks/README.md`` has the profile.
    """
    if attention != "auto":
        return attention
    return "math" if device.type == "cpu" and precision in ("bf16", "fp16") else "fused"


def set_attention(model: nn.Module, attention: str) -> int:
    """Switch every timm attention block (``fused_attn``) in ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = attention == "fused"
            count += 1
    return count


def set_threads(threads: int) -> None:
    """Intra-op threads for this process (0: leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
