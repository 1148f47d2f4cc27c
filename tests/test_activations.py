"""GELU that stores its derivative (run.gelu_backward): same function, same gradient,
and a backward graph without erf or exp once compiled."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deitctl.activations import SavedDerivativeGELU, gelu_and_derivative, save_gelu_derivative


def test_value_and_derivative_match_torch_over_the_whole_range():
    x = torch.cat(
        [
            torch.linspace(-12, 12, 200_001, dtype=torch.float64),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=torch.float64),
        ]
    )
    value, derivative = gelu_and_derivative(x)
    assert (value - F.gelu(x)).abs().max() < 2e-7 * x.abs().clamp(min=1).max()
    xr = x.clone().requires_grad_()
    F.gelu(xr).sum().backward()
    assert (derivative - xr.grad).abs().max() < 2e-7
    # the tails: exactly x and 1 for large positive x, (nearly) 0 for large negative x
    assert value[-5] == x[-5] and derivative[-5] == 1.0
    assert abs(value[0]) < 1e-30 and abs(derivative[0]) < 1e-30


def test_outside_compile_it_is_torchs_gelu_bit_for_bit():
    x = torch.randn(64, 48, requires_grad=True)
    y = SavedDerivativeGELU()(x)
    assert torch.equal(y, F.gelu(x))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (ref,) = torch.autograd.grad(F.gelu(x).square().sum(), x)
    assert torch.equal(g, ref)


def test_swaps_exact_gelus_only_and_keeps_the_state_dict():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8)
    keys = list(model.state_dict())
    model.add_module("tanh_gelu", nn.GELU(approximate="tanh"))
    assert save_gelu_derivative(model) == 2
    assert sum(isinstance(m, SavedDerivativeGELU) for m in model.modules()) == 2
    assert isinstance(model.tanh_gelu, nn.GELU)
    assert list(model.state_dict()) == keys


class _MLP(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), act, nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _compiled_step(act: nn.Module, x: torch.Tensor):
    """Compile with what torch.compile's inductor uses before code generation (its
    decompositions, the min-cut partitioner), recording the backward graph."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    torch.manual_seed(0)
    model = _MLP(act)
    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(
        fw_compiler=keep("forward"),
        bw_compiler=keep("backward"),
        partition_fn=min_cut_rematerialization_partition,
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    y = torch.compile(model, backend=backend)(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ops = {str(n.target) for n in graphs["backward"].graph.nodes if n.op == "call_function"}
    return y.detach(), grads, ops


def test_torchs_in_place_notice_for_the_checkpoint_policy_is_dropped():
    # torch warns once per process when a checkpoint policy is compiled; one GELU has no in-place op
    import logging

    from deitctl.activations import save_gelu_derivative

    save_gelu_derivative(nn.Sequential(nn.GELU()))
    save_gelu_derivative(nn.Sequential(nn.GELU()))
    notices = logging.getLogger("torch._higher_order_ops.wrap")
    assert len(notices.filters) == 1

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(notices.name, logging.WARNING, __file__, 1, message, None, None)

    notice = "\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\n"
    assert not notices.filter(record(notice))
    assert notices.filter(record("something else"))


@pytest.mark.slow
def test_compiled_backward_multiplies_by_the_saved_derivative():
    x = torch.randn(32, 16)
    y_ref, grads_ref, ops_ref = _compiled_step(nn.GELU(), x)
    y, grads, ops = _compiled_step(SavedDerivativeGELU(), x)
    torch._dynamo.reset()
    assert any("erf" in op for op in ops_ref)  # PyTorch's GELU evaluates erf again in the backward
    assert not any("erf" in op or "exp" in op for op in ops), ops
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    for g, ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_bf16_values_are_nn_gelus_bit_for_bit():
    """With inductor's generated code (as run.compile uses it), in bf16 as autocast feeds it."""
    import platform

    torch._dynamo.reset()
    x = (torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    grad = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    from torch._dynamo.utils import counters

    results = []
    for act in (nn.GELU(), SavedDerivativeGELU()):
        counters.clear()
        xr = x.clone().requires_grad_()
        y = torch.compile(act)(xr)
        y.backward(grad)
        results.append((y.detach(), xr.grad))
    torch._dynamo.reset()
    # the compiled graphs can be cached across processes like PyTorch's own GELU's
    assert counters["aot_autograd"].get("autograd_cache_bypass", 0) == 0, dict(counters["aot_autograd"])
    (y_ref, g_ref), (y, g) = results
    if platform.machine() in ("x86_64", "AMD64"):  # PyTorch's vectorised erf there is A&S 7.1.26, as ours
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y, y_ref, rtol=8e-3, atol=1e-6)
    # gradients: the same up to fp32 rounding before the cast to bf16 (one unit in rare places)
    torch.testing.assert_close(g, g_ref, rtol=8e-3, atol=1e-6)
    assert (g != g_ref).float().mean() < 1e-3
