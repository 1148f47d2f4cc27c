"""``run.compile``'s graph pass: CPU column sums become a product with a row of ones, bias
adds move into the element-wise kernel after the product, and wide weight gradients are
computed transposed; each changes float rounding only."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from deitctl import compiler
from deitctl.compiler import compile_module, rewrite_bias_adds, rewrite_column_sums, rewrite_weight_gradients

aten = torch.ops.aten


def _sums(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.target is aten.sum.dim_IntList]


def test_sums_over_leading_dims_become_a_product_and_the_others_stay():
    def f(tokens, rows, few, half):
        return (
            tokens.sum([0, 1]),  # a layer norm's weight gradient: rewritten
            rows.sum(0, keepdim=True),  # a bias gradient: rewritten
            rows.sum(1),  # over columns: stays
            few.sum(0),  # 64 rows: stays
            half.sum(0),  # bf16: stays
        )

    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(8, 66, 48, generator=g),
        torch.randn(528, 96, generator=g),
        torch.randn(64, 10, generator=g),
        torch.randn(528, 96, generator=g).bfloat16(),
    )
    module = make_fx(f, tracing_mode="fake")(*inputs)
    assert len(_sums(module.graph)) == 5

    assert rewrite_column_sums(module.graph) == 2
    module.recompile()

    left = _sums(module.graph)
    assert [n.args[1] for n in left] == [[1], [0], [0]]
    assert sum(n.target is aten.mm.default for n in module.graph.nodes) == 2
    for got, want in zip(module(*inputs), f(*inputs), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def _calls(graph: torch.fx.Graph, target) -> int:
    return sum(n.target is target for n in graph.nodes)


def test_bias_adds_with_element_wise_users_become_a_product_then_an_add():
    def f(x, w, b, few):
        hidden = torch.addmm(b, x, w)
        return (
            torch.nn.functional.gelu(hidden) + 1.0,  # element-wise users only: rewritten
            torch.addmm(b, x, w),  # a graph output: stays
            torch.addmm(b, few, w).relu(),  # 64 rows: stays
        )

    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(528, 48, generator=g),
        torch.randn(48, 96, generator=g),
        torch.randn(96, generator=g),
        torch.randn(64, 48, generator=g),
    )
    module = make_fx(f, tracing_mode="fake")(*inputs)
    assert _calls(module.graph, aten.addmm.default) == 3

    assert rewrite_bias_adds(module.graph) == 1
    module.recompile()

    assert _calls(module.graph, aten.addmm.default) == 2
    assert _calls(module.graph, aten.mm.default) == 1
    for got, want in zip(module(*inputs), f(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_wide_weight_gradients_are_computed_transposed_and_the_others_stay():
    def f(g_wide, x, g_narrow, few):
        return (
            torch.mm(g_wide.permute(1, 0), x),  # 192 outputs from 48 inputs (qkv, fc1): rewritten
            torch.mm(g_narrow.permute(1, 0), x),  # 16 outputs from 48 inputs (fc2, proj): stays
            torch.mm(few.permute(1, 0), few),  # 64 rows: stays
        )

    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(528, 192, generator=g),
        torch.randn(528, 48, generator=g),
        torch.randn(528, 16, generator=g),
        torch.randn(64, 96, generator=g),
    )
    module = make_fx(f, tracing_mode="fake")(*inputs)

    assert rewrite_weight_gradients(module.graph) == 1
    module.recompile()

    products = [n for n in module.graph.nodes if n.target is aten.mm.default]
    assert [tuple(n.meta["val"].shape) for n in products] == [(48, 192), (16, 48), (96, 96)]
    for got, want in zip(module(*inputs), f(*inputs), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def _tiny_deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=10
    )


def _grads(model: torch.nn.Module, forward, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cls, dist = forward(x)
    (torch.nn.functional.cross_entropy(cls, y) + torch.nn.functional.cross_entropy(dist, y)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_a_compiled_deit_step_has_the_eager_gradients_and_the_pass_ran():
    """A training step of a 2-block DeiT⚗ (8 × 66 tokens = 528 rows), compiled as run.compile
    does, against the same step in eager mode."""
    model = _tiny_deit().train()
    model.set_distilled_training(True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    before = compiler.CpuTrainingPass.rewritten.copy()
    torch._dynamo.reset()
    uncached = (  # so that the pass runs here, not a cached graph from an earlier run
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    )
    with uncached[0], uncached[1], torch.random.fork_rng():
        compiled = _grads(model, compile_module(model), x, y)
    with torch.random.fork_rng():
        eager = _grads(model, model, x, y)
    rewritten = compiler.CpuTrainingPass.rewritten - before
    # every linear layer's bias and both layer norms' parameters in each block, and the final norm
    assert rewritten["column_sums"] >= 2 * (4 + 4) + 2
    # proj and fc2 in each block (qkv feeds attention, and fc1's output is also saved for
    # GELU's backward: neither has element-wise users only)
    assert rewritten["bias_adds"] == 2 * 2
    # qkv (192 from 64) and fc1 (256 from 64) in each block
    assert rewritten["weight_gradients"] == 2 * 2
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
