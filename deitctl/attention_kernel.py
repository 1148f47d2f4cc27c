"""deitctl's C++ attention kernel for short sequences on the CPU (``run.attention = "cpp"``).

PyTorch's attention on a CPU spends most of its time outside the matmuls when sequences are
short (DeiT-Ti on 32-px images with 4-px patches: 66 tokens): the batched matmuls of the
explicit path, its softmax and its layout copies each pass over memory, and the fused
kernel works in blocks of 32 queries. ``csrc/attention.cpp`` runs one task per (image,
head) with the tiles read straight from the ``qkv`` projection and kept in cache from
``q kᵀ`` through the softmax to ``p v``, and the same in the backward (which recomputes
nothing). It is built at first use with ``torch.utils.cpp_extension`` (the C++ compiler
``torch.compile`` also needs), once per machine and source, and registered as the custom
operators ``deitctl::attention`` and ``deitctl::attention_backward``, which
``torch.compile`` keeps whole. fp32 only: other precisions and devices take the explicit
path. The result is the explicit path's up to float rounding
(``tests/test_attention_kernel.py``).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"

#: Compiler flags per ATen CPU capability, so ``at::vec`` vectorises as ATen's own kernels do.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def _extension() -> Any:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = CAPABILITY_FLAGS.get(capability, []) if platform.machine() in ("x86_64", "AMD64") else []
    defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"] if flags else []
    return load(
        name=f"deitctl_attention_{capability.lower() if flags else 'default'}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp", *flags, *defines],
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("DEITCTL_DEBUG") == "1",
    )


@functools.cache
def unavailable() -> str:
    """Why the kernel cannot run here ("" when it can): it is built on first call."""
    try:
        _extension()
    except Exception as error:  # a missing compiler or BLAS symbol: any build or load failure
        return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    return ""


@torch.library.custom_op("deitctl::attention", mutates_args=())
def _attention(qkv: Tensor, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    out, probs = _extension().forward(qkv, heads, scale)
    return out, probs


@_attention.register_fake
def _(qkv: Tensor, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    batch, tokens, width = qkv.shape
    return qkv.new_empty(batch, tokens, width // 3), qkv.new_empty(batch * heads, tokens, tokens)


@torch.library.custom_op("deitctl::attention_backward", mutates_args=())
def _attention_backward(grad: Tensor, qkv: Tensor, probs: Tensor, heads: int, scale: float) -> Tensor:
    return _extension().backward(grad.contiguous(), qkv, probs, heads, scale)


@_attention_backward.register_fake
def _(grad: Tensor, qkv: Tensor, probs: Tensor, heads: int, scale: float) -> Tensor:
    return torch.empty_like(qkv)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    qkv, heads, scale = inputs
    ctx.save_for_backward(qkv, output[1])
    ctx.heads, ctx.scale = heads, scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad: Tensor, _probs_grad: Tensor | None) -> tuple[Tensor, None, None]:
    qkv, probs = ctx.saved_tensors
    return _attention_backward(grad, qkv, probs, ctx.heads, ctx.scale), None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def applies(x: Tensor) -> bool:
    """Whether the kernel runs on a block's input ``x``: fp32 on the CPU, outside CPU
    autocast (so its ``qkv`` projection is fp32 too); else callers take the explicit path."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def kernel_attention(qkv: Tensor, heads: int, scale: float) -> Tensor:
    """Self-attention over a contiguous fp32 CPU ``qkv`` projection (``B × N × 3·H·D``);
    returns the heads' outputs side by side (``B × N × H·D``)."""
    return _attention(qkv.contiguous(), heads, scale)[0]
