"""Attention as explicit batched matmuls with a hand-written backward (``run.attention =
"math"`` outside ``torch.compile``): the same function as timm's, fewer passes over memory.

timm's explicit path (``fused_attn = False``) scales ``q`` in a pass of its own, lets
``matmul`` copy the strided ``q``/``k``/``v`` views, and its autograd stacks and copies the
three gradients back into the ``qkv`` layout. PyTorch's fused CPU kernel works in blocks of
32 queries with many small GEMM calls, which is slow for short sequences. Here one function
takes the ``qkv`` projection as it comes (``B × N × 3·H·D``), makes ``q``, ``k`` and ``v``
contiguous in one copy, folds the scale into the GEMMs (``alpha``), and writes the three
gradients into one buffer laid out as ``qkv``. The numerics are the explicit path's up to
float rounding (``tests/test_attention.py``).

The swap applies to timm's ``Attention`` blocks without masks, dropout on the attention
weights, q/k normalisation or gating (DeiT's); others keep their kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _ExplicitAttention(torch.autograd.Function):
    """``softmax(q kᵀ · scale) v`` over ``qkv`` (``B × N × 3·H·D``); returns ``B × N × H·D``."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        batch, tokens, width = qkv.shape
        head_dim = width // (3 * heads)
        # q, k, v as [3, B·H, N, D], contiguous: one copy
        qkv3 = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        qkv3 = qkv3.reshape(3, batch * heads, tokens, head_dim)
        q, k, v = qkv3.unbind(0)
        scores = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0.0, alpha=scale)
        probs = torch.softmax(scores, dim=-1)  # under CUDA autocast: in fp32
        out = torch.bmm(probs.to(v.dtype), v)
        ctx.save_for_backward(qkv3, probs)
        ctx.shape, ctx.scale, ctx.scores_dtype = (batch, heads, tokens, head_dim), scale, scores.dtype
        return out.view(batch, heads, tokens, head_dim).transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qkv3, probs = ctx.saved_tensors
        batch, heads, tokens, head_dim = ctx.shape
        q, k, v = qkv3.unbind(0)
        dtype = qkv3.dtype
        grad = grad.to(dtype).view(batch, tokens, heads, head_dim).transpose(1, 2)
        grad = grad.reshape(batch * heads, tokens, head_dim)
        grads = torch.empty_like(qkv3)
        torch.bmm(probs.to(dtype).transpose(1, 2), grad, out=grads[2])
        grad_probs = torch.bmm(grad, v.transpose(1, 2)).to(probs.dtype)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, ctx.scores_dtype).to(dtype)
        del grad_probs
        torch.baddbmm(grads[0], grad_scores, k, beta=0.0, alpha=ctx.scale, out=grads[0])
        torch.baddbmm(grads[1], grad_scores.transpose(1, 2), q, beta=0.0, alpha=ctx.scale, out=grads[1])
        grads = grads.view(3, batch, heads, tokens, head_dim).permute(1, 3, 0, 2, 4)
        return grads.reshape(batch, tokens, 3 * heads * head_dim), None, None


def explicit_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Self-attention over a ``qkv`` projection (``B × N × 3·H·D``) as explicit batched
    matmuls; returns the heads' outputs side by side (``B × N × H·D``)."""
    return _ExplicitAttention.apply(qkv, heads, scale)


def _explicit_forward(self: Any, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` through :func:`explicit_attention`; timm's own (explicit)
    path with a mask, and inside ``torch.compile``, whose fusions do better with plain ops."""
    if attn_mask is not None or is_causal or torch.compiler.is_compiling():
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    out = explicit_attention(self.qkv(x), self.num_heads, self.scale)
    return self.proj_drop(self.proj(self.norm(out)))


def _kernel_forward(self: Any, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` through deitctl's C++ kernel
    (:mod:`deitctl.attention_kernel`) where it applies (fp32 on the CPU), else as
    :func:`_explicit_forward`."""
    from deitctl.attention_kernel import applies, kernel_attention

    if attn_mask is not None or is_causal or not applies(x):
        return _explicit_forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    out = kernel_attention(self.qkv(x), self.num_heads, self.scale)
    return self.proj_drop(self.proj(self.norm(out)))


def _swappable(module: nn.Module) -> bool:
    from timm.layers import Attention

    return (
        isinstance(module, Attention)
        and isinstance(module.q_norm, nn.Identity)
        and isinstance(module.k_norm, nn.Identity)
        and getattr(module, "gate", None) is None
        and module.attn_drop.p == 0.0
        and module.attn_dim == module.num_heads * module.head_dim
    )


def set_explicit_attention(model: nn.Module, enabled: bool, kernel: bool = False) -> int:
    """Route timm's plain attention blocks in ``model`` through :func:`explicit_attention`
    (``enabled``), deitctl's C++ kernel (``kernel``) or back to their own forward; returns
    how many blocks were switched. The parameters and the state dict are not touched."""
    count = 0
    for module in model.modules():
        if _swappable(module):
            if kernel:
                module.forward = _kernel_forward.__get__(module)
            elif enabled:
                module.forward = _explicit_forward.__get__(module)
            elif "forward" in vars(module):
                del module.forward
            count += 1
    return count
