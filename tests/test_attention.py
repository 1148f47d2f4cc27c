"""``run.attention = "math"`` in eager: deitctl's explicit attention (one function over the
``qkv`` projection, hand-written backward) computes what timm's explicit path computes."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from deitctl import attention
from deitctl.attention import explicit_attention, set_explicit_attention
from deitctl.runtime import set_attention


def _deit(head_dim: int = 64, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=2 * head_dim,
        num_heads=2, num_classes=10, **kwargs,
    )  # fmt: skip
    model.set_distilled_training(True)  # both heads' logits, as in training
    return model


def _step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        cls, dist = model(x)
    (cls.float().logsumexp(-1).sum() + dist.float().square().mean()).backward()
    return cls.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _timm_math(model: torch.nn.Module) -> torch.nn.Module:
    timm_model = copy.deepcopy(model)
    for block in timm_model.blocks:
        block.attn.fused_attn = False
    assert set_explicit_attention(timm_model, False) == 2  # timm's own forward
    return timm_model


@pytest.mark.parametrize("head_dim", [64, 24])  # a scale of 1/8 is exact; 24's is not
def test_explicit_attention_equals_timms_explicit_path_in_fp32(head_dim, monkeypatch):
    model = _deit(head_dim)
    x = torch.randn(6, 3, 32, 32)
    reference, reference_grads = _step(_timm_math(model), x)
    assert set_attention(model, "math") == 2
    assert all("forward" in vars(b.attn) for b in model.blocks)
    calls = _count_calls(monkeypatch)
    out, grads = _step(model, x)
    assert calls == [2]  # both blocks went through it
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_explicit_attention_under_bf16_autocast_matches_timms():
    model = _deit()
    x = torch.randn(4, 3, 32, 32)
    reference, reference_grads = _step(_timm_math(model), x, torch.bfloat16)
    set_attention(model, "math")
    out, grads = _step(model, x, torch.bfloat16)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        scale = reference_grads[name].abs().max().clamp_min(1e-6)
        assert (grad - reference_grads[name]).abs().max() / scale < 3e-2, name


def test_the_function_against_float64():
    torch.manual_seed(0)
    qkv = torch.randn(3, 5, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v
    got = explicit_attention(qkv, 2, 0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(3, 5, 16))
    assert torch.autograd.gradcheck(lambda t: explicit_attention(t, 2, 0.3), (qkv,))


def test_masks_and_torch_compile_take_timms_path(monkeypatch):
    model = _deit()
    set_attention(model, "math")
    block = model.blocks[0].attn
    x = torch.randn(2, 6, 128)
    mask = torch.zeros(6, 6, dtype=torch.bool).fill_diagonal_(True).logical_not()
    calls = _count_calls(monkeypatch)
    assert block(x, attn_mask=mask).shape == x.shape
    assert calls == [0]

    compiled = torch.compile(model.blocks[1].attn)
    torch.testing.assert_close(compiled(x), model.blocks[1].attn(x), rtol=1e-5, atol=1e-6)
    assert calls == [1]  # the eager call above; the compiled one traced timm's ops


def test_switching_back_and_what_is_left_alone():
    model = _deit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_attention(model, "math")
    assert model.state_dict().keys() == state.keys()
    copied = copy.deepcopy(model)  # the tuner times copies
    assert all("forward" in vars(b.attn) for b in copied.blocks)
    set_attention(model, "fused")
    assert not any("forward" in vars(b.attn) for b in model.blocks)
    # dropout on the attention weights or q/k normalisation: timm's path
    assert set_explicit_attention(_deit(attn_drop_rate=0.1), True) == 0
    assert set_explicit_attention(_deit(qk_norm=True), True) == 0


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = attention._ExplicitAttention.apply

    def counting(*args: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(attention._ExplicitAttention, "apply", counting)
    return calls
