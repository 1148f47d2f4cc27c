"""GELU whose forward also stores its derivative, for compiled training on the CPU.

PyTorch's GELU backward computes ``erf`` and ``exp`` again from the saved input. On a
CPU those two functions, not memory, bound the kernel (measured: the compiled bf16
forward takes 5–6× a plain scale-and-shift of the same tensor), so a compiled DeiT step
evaluates them twice per MLP. :class:`SavedDerivativeGELU` evaluates them once: its
forward writes GELU(x) and GELU'(x) (fp32) from one ``exp``, and the backward is one
multiply. ``erf`` is Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), the formula
of PyTorch's own vectorised CPU ``erf``; the compiled bf16 outputs are those of
``nn.GELU`` bit for bit (tested).

It takes effect inside ``torch.compile`` with gradients on; elsewhere (eager, eval,
inference) it is ``F.gelu``, whose single kernel is faster there. Selective activation
checkpointing marks the forward's results as must-save, so the compiler's partitioner
keeps the derivative instead of recomputing it from the smaller input. An infinite input
gives NaN where ``F.gelu`` gives ±inf/0 (training has diverged by then anyway).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_P = 0.3275911  # Abramowitz & Stegun 7.1.26
_A1, _A2, _A3, _A4, _A5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429


def gelu_and_derivative(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(x) and its derivative Φ(x) + x·φ(x), sharing one ``exp(-x²/2)``."""
    z = x * _SQRT_HALF
    t = 1.0 / (_P * z.abs() + 1.0)
    poly = (((_A5 * t + _A4) * t + _A3) * t + _A2) * t + _A1
    gauss = torch.exp(-z * z)  # exp(-x²/2): erf's tail and, scaled, the normal density φ(x)
    cdf = 0.5 * (1.0 + torch.copysign(1.0 - poly * t * gauss, z))
    return x * cdf, cdf + x * gauss * _INV_SQRT_2PI


def _gelu_with_constant_derivative(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) whose gradient autograd takes as ``grad * derivative``, a saved constant.

    ``x - x.detach()`` is zero in the forward and passes the gradient in the backward: the
    value is GELU's and the backward is one multiply. (Plain tensor operations rather
    than an ``autograd.Function``, which AOTAutograd's cache cannot hold: compiled runs
    would trace it again in every process.)
    """
    xf = x.float()
    value, derivative = gelu_and_derivative(xf.detach())
    return (value + (xf - xf.detach()) * derivative).to(x.dtype)


def _save_everything(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE


def _must_save_context() -> Callable[[], Any] | None:
    """``context_fn`` for ``checkpoint`` that saves every result (None on old torch)."""
    try:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
    except ImportError:  # torch < 2.4: the partitioner decides alone
        return None
    context = functools.partial(create_selective_checkpoint_contexts, _save_everything)
    context.cache_hash = "deitctl.activations._save_everything"  # type: ignore[attr-defined]  # lets AOTAutograd cache the graphs
    return context


_MUST_SAVE = _must_save_context()  # built here, not while torch.compile traces


def _gelu_saving_derivative(x: torch.Tensor) -> torch.Tensor:
    if _MUST_SAVE is None:
        return _gelu_with_constant_derivative(x)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_gelu_with_constant_derivative, x, use_reentrant=False, context_fn=_MUST_SAVE)


class SavedDerivativeGELU(nn.Module):
    """Exact GELU (``nn.GELU()``) whose compiled training forward stores its derivative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad:
            return _gelu_saving_derivative(x)
        return F.gelu(x)


def _timm_gelu() -> tuple[type, ...]:
    try:
        from timm.layers.activations import GELU
    except ImportError:
        return ()
    return (GELU,)


class _InPlaceNotice(logging.Filter):
    """Drops torch's notice that a checkpoint policy is compiled ("make sure the checkpointed
    region does not contain in-place ops"): the region here is one GELU, which has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def save_gelu_derivative(model: nn.Module) -> int:
    """Replace every exact GELU module (``nn.GELU``, timm's ``GELU``) in ``model`` with
    :class:`SavedDerivativeGELU`; returns how many.

    GELU has no parameters, so state dicts and checkpoints are unchanged.
    """
    notices = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _InPlaceNotice) for f in notices.filters):
        notices.addFilter(_InPlaceNotice())
    exact = (nn.GELU, *_timm_gelu())
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) in exact and getattr(child, "approximate", "none") == "none":
                setattr(module, name, SavedDerivativeGELU())
                count += 1
    return count
