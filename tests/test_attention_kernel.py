"""``run.attention = "cpp"``: deitctl's C++ attention kernel computes what timm's explicit
path computes (outputs and every gradient, eager and compiled), counts the same FLOPs, falls
back where it does not apply, and is one of ``auto``'s candidates on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import finish, spawn, train_args

from deitctl.attention_kernel import kernel_attention, unavailable
from deitctl.machine import flops_per_image
from deitctl.runtime import set_attention

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"no C++ toolchain: {unavailable()}")


def _deit(tokens_side: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=4 * tokens_side, patch_size=4, depth=2, num_classes=10
    )
    model.set_distilled_training(True)
    return model


def _step(
    model: torch.nn.Module, x: torch.Tensor, runner: torch.nn.Module | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    cls, dist = (model if runner is None else runner)(x)
    (cls.logsumexp(-1).sum() + dist.square().mean()).backward()
    return cls.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_kernel_matches_explicit_attention_forward_and_backward() -> None:
    torch.manual_seed(1)
    batch, tokens, heads, head_dim = 3, 66, 3, 64  # DeiT-Ti on 32 px with 4-px patches, odd sizes
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, requires_grad=True)
    scale = head_dim**-0.5
    q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    expected = ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    expected = expected.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad)

    leaf = qkv.detach().clone().requires_grad_()
    out = kernel_attention(leaf, heads, scale)
    out.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_deit_step_through_kernel_equals_timm_math(compiled: bool) -> None:
    model = _deit()
    x = torch.randn(4, 3, 32, 32)
    reference = copy.deepcopy(model)
    set_attention(reference, "math")
    expected_out, expected_grads = _step(reference, x)

    assert set_attention(model, "cpp") == 2
    out, grads = _step(model, x, torch.compile(model) if compiled else None)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_graph_keeps_the_kernel_whole() -> None:
    model = _deit()
    set_attention(model, "cpp")
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(2, 3, 32, 32))
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert targets.count(torch.ops.deitctl.attention.default) == 2


def test_kernel_counts_the_flops_of_explicit_attention() -> None:
    model = _deit()
    x = torch.randn(2, 3, 32, 32)
    set_attention(model, "math")
    expected = flops_per_image(model, None, x)
    set_attention(model, "cpp")
    assert flops_per_image(model, None, x) == expected


def test_other_precisions_take_the_explicit_path() -> None:
    model = _deit()
    set_attention(model, "cpp")
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_auto_times_the_kernel_on_cpu() -> None:
    from deitctl.tuning import _check_kernel

    options = {"attention": ["fused", "math"]}
    _check_kernel(SimpleNamespace(attention="auto"), options, None)
    assert options["attention"] == ["fused", "math", "cpp"]
    fixed = {"attention": ["cpp"]}
    _check_kernel(SimpleNamespace(attention="cpp"), fixed, None)
    assert fixed["attention"] == ["cpp"]


def test_a_recipe_naming_the_kernel_where_it_cannot_build_exits_2(tmp_path: Path) -> None:
    # a real failed build: no C++ compiler (CXX=false) and an empty extensions folder
    out = tmp_path / "run"
    proc = spawn(
        train_args(out, "run.attention=cpp", "run.epochs=1"),
        CXX="false",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
        DEITCTL_CACHE_DIR=str(tmp_path / "cache"),
    )
    code, output = finish(proc)
    assert code == 2, output
    assert "tiny.toml" in output and "[run.attention]" in output and "cannot be built" in output
    assert "Traceback" not in output
