"""Unit tests of the distillation losses against values computed by hand.

Every expected value here is computed in plain Python (``math.exp`` /
``math.log`` over lists), independently of torch's ``cross_entropy`` /
``kl_div``, from the formulas in the DeiT paper (Touvron et al., 2021):

* none : CE(ψ(Zs), y)
* soft : (1−α)·CE(ψ(Zs), y) + α·τ²·KL(ψ(Zt/τ) ‖ ψ(Zs/τ))   (eq. 2, α=0.1, τ=3)
* hard : ½·CE(ψ(Zs), y) + ½·CE(ψ(Zs), argmax Zt)          (eq. 3)
* token: (1−α)·base(cls, y) + α·[CE(dist, argmax Zt) | τ²·KL(teacher ‖ dist)]

The KL term is divided by the batch ("batchmean", the paper) or by
batch × classes ("official", facebookresearch/deit's ``losses.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from deitctl_plugins import strategies as S

REL = 1e-6  # tolerance for hand-vs-strategy comparisons (tensors are float64)


# --------------------------------------------------------------------------
# Plain-math reference (lists of floats; no torch)
# --------------------------------------------------------------------------


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def softmax(row):
    return [math.exp(v) for v in log_softmax(row)]


def argmax(row):
    best = max(row)
    assert row.count(best) == 1, "test data must not have ties"
    return row.index(best)


def ce(logits, labels):
    """Mean over the batch of −log p[y]."""
    return sum(-log_softmax(r)[y] for r, y in zip(logits, labels)) / len(logits)


def ls_ce(logits, labels, eps):
    """timm LabelSmoothingCrossEntropy: (1−ε)·(−log p[y]) + ε·mean_j(−log p_j)."""
    total = 0.0
    for r, y in zip(logits, labels):
        lp = log_softmax(r)
        total += (1 - eps) * (-lp[y]) + eps * (-sum(lp) / len(lp))
    return total / len(logits)


def soft_ce(logits, targets):
    """Mean over the batch of −Σ_j t_j·log p_j (timm SoftTargetCrossEntropy)."""
    total = 0.0
    for r, t in zip(logits, targets):
        lp = log_softmax(r)
        total += -sum(tj * lpj for tj, lpj in zip(t, lp))
    return total / len(logits)


def kl_sum(student, teacher, tau):
    """Σ_batch Σ_j p_t·(log p_t − log p_s), at temperature τ: KL(teacher ‖ student)."""
    total = 0.0
    for s, t in zip(student, teacher):
        lps = log_softmax([v / tau for v in s])
        lpt = log_softmax([v / tau for v in t])
        total += sum(math.exp(a) * (a - b) for a, b in zip(lpt, lps))
    return total


def soft_kd(student, teacher, tau, reduction):
    denom = len(student) if reduction == "batchmean" else len(student) * len(student[0])
    return tau * tau * kl_sum(student, teacher, tau) / denom


def T(rows, requires_grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


# --------------------------------------------------------------------------
# Data: batch 2, 3 classes; teacher's argmax ≠ label in both rows
# --------------------------------------------------------------------------

STUDENT = [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]]  # class head
DIST = [[-0.5, 1.5, 0.2], [0.7, -0.3, 1.1]]  # distillation head
TEACHER = [[0.3, 2.5, -0.4], [1.9, 0.2, 0.4]]  # argmax: [1, 0]
LABELS = [0, 2]
TEACHER_LABELS = [argmax(r) for r in TEACHER]

# Mixup target by hand: λ = 0.7 of (y) mixed with 0.3 of the flipped batch
# (labels [2, 0]), each one-hot smoothed with ε = 0.1 over 3 classes:
# on = 1 − 0.1 + 0.1/3, off = 0.1/3.
_ON, _OFF, _LAM = 1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.7
MIXED = [
    [_LAM * _ON + (1 - _LAM) * _OFF, _OFF, _LAM * _OFF + (1 - _LAM) * _ON],  # ≈ [0.6633, 0.0333, 0.3033]
    [_LAM * _OFF + (1 - _LAM) * _ON, _OFF, _LAM * _ON + (1 - _LAM) * _OFF],  # ≈ [0.3033, 0.0333, 0.6633]
]


def labels():
    return torch.tensor(LABELS)


# --------------------------------------------------------------------------
# The reference itself (closed forms, so the helpers are trusted)
# --------------------------------------------------------------------------


def test_reference_helpers_closed_forms():
    # uniform logits: CE = ln 3
    assert ce([[0.0, 0.0, 0.0]], [1]) == pytest.approx(math.log(3), rel=1e-12)
    # p_s = [1/4, 1/2, 1/4], p_t = [1/4, 1/4, 1/2]: KL(t‖s) = ¼·ln½ + ½·ln2 = ¼·ln2
    s = [[0.0, math.log(2), 0.0]]
    t = [[0.0, 0.0, math.log(2)]]
    assert kl_sum(s, t, 1.0) == pytest.approx(0.25 * math.log(2), rel=1e-12)
    assert kl_sum(s, s, 3.0) == pytest.approx(0.0, abs=1e-15)
    # the hand-written mixup rows are distributions
    for row in MIXED:
        assert sum(row) == pytest.approx(1.0, rel=1e-12)
    assert TEACHER_LABELS == [1, 0]


def test_hand_mixup_target_matches_timm_mixup_target():
    """Cross-check only: the hand matrix is what timm's Mixup would produce."""
    from timm.data.mixup import mixup_target

    got = mixup_target(labels(), 3, lam=_LAM, smoothing=0.1)
    torch.testing.assert_close(got.double(), T(MIXED), rtol=1e-6, atol=1e-7)


def test_soft_closed_form_on_strategy():
    """α=1, τ=1, one image: the loss is exactly ¼·ln 2 (see above)."""
    strat = S.soft(alpha=1.0, tau=1.0)
    loss = strat(T([[0.0, math.log(2), 0.0]]), torch.tensor([0]), T([[0.0, 0.0, math.log(2)]]), nn.CrossEntropyLoss())
    assert loss.item() == pytest.approx(0.25 * math.log(2), rel=1e-12)


# --------------------------------------------------------------------------
# none
# --------------------------------------------------------------------------


def test_none_is_ce_on_logits():
    strat = S.none()
    assert strat.uses_teacher is False
    loss = strat(T(STUDENT), labels(), None, nn.CrossEntropyLoss())
    assert loss.item() == pytest.approx(ce(STUDENT, LABELS), rel=REL)


def test_none_with_tuple_uses_class_head():
    strat = S.none()
    loss = strat((T(STUDENT), T(DIST)), labels(), None, nn.CrossEntropyLoss())
    assert loss.item() == pytest.approx(ce(STUDENT, LABELS), rel=REL)
    assert loss.item() != pytest.approx(ce(DIST, LABELS), rel=1e-3)


def test_none_with_label_smoothing_base():
    loss = S.none()(T(STUDENT), labels(), None, LabelSmoothingCrossEntropy(0.1))
    assert loss.item() == pytest.approx(ls_ce(STUDENT, LABELS, 0.1), rel=REL)


# --------------------------------------------------------------------------
# soft
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, tau",
    [(0.1, 3.0), (0.5, 1.0), (0.3, 2.0), (0.75, 0.5)],
    ids=["paper-0.1-3", "official-cli-0.5-1", "0.3-2", "0.75-0.5"],
)
@pytest.mark.parametrize("reduction", ["batchmean", "official"])
def test_soft_loss_by_hand(alpha, tau, reduction):
    strat = S.soft(alpha=alpha, tau=tau, kl_reduction=reduction)
    loss = strat(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = (1 - alpha) * ce(STUDENT, LABELS) + alpha * soft_kd(STUDENT, TEACHER, tau, reduction)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_soft_defaults_are_paper_values():
    """soft() with no arguments: α = 0.1, τ = 3, divided by the batch."""
    loss = S.soft()(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = 0.9 * ce(STUDENT, LABELS) + 0.1 * 9.0 * kl_sum(STUDENT, TEACHER, 3.0) / 2
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_soft_with_tuple_uses_class_head():
    strat = S.soft(alpha=0.1, tau=3.0)
    loss = strat((T(STUDENT), T(DIST)), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = 0.9 * ce(STUDENT, LABELS) + 0.1 * soft_kd(STUDENT, TEACHER, 3.0, "batchmean")
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("num_classes", [3, 5])
@pytest.mark.parametrize("tau", [3.0, 1.0])
def test_soft_official_reduction_ratio_is_num_classes(num_classes, tau):
    """With α = 1 only the KL term is left: batchmean / official == classes exactly."""
    student = [[0.2 * j - 0.1 * i + 0.05 * j * j for j in range(num_classes)] for i in range(2)]
    teacher = [[math.sin(1.0 + i + 0.7 * j) for j in range(num_classes)] for i in range(2)]
    y = torch.tensor([0, num_classes - 1])
    bm = S.soft(alpha=1.0, tau=tau, kl_reduction="batchmean")(T(student), y, T(teacher), nn.CrossEntropyLoss())
    off = S.soft(alpha=1.0, tau=tau, kl_reduction="official")(T(student), y, T(teacher), nn.CrossEntropyLoss())
    assert bm.item() == pytest.approx(soft_kd(student, teacher, tau, "batchmean"), rel=REL)
    assert off.item() == pytest.approx(soft_kd(student, teacher, tau, "official"), rel=REL)
    assert (bm / off).item() == pytest.approx(num_classes, rel=1e-12)


def test_soft_alpha_zero_is_plain_ce():
    loss = S.soft(alpha=0.0, tau=3.0)(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())
    assert loss.item() == pytest.approx(ce(STUDENT, LABELS), rel=REL)


def test_soft_with_label_smoothing_base():
    strat = S.soft(alpha=0.1, tau=3.0)
    loss = strat(T(STUDENT), labels(), T(TEACHER), LabelSmoothingCrossEntropy(0.1))
    expected = 0.9 * ls_ce(STUDENT, LABELS, 0.1) + 0.1 * soft_kd(STUDENT, TEACHER, 3.0, "batchmean")
    assert loss.item() == pytest.approx(expected, rel=REL)


# --------------------------------------------------------------------------
# hard
# --------------------------------------------------------------------------


def test_hard_default_is_half_and_half():
    loss = S.hard()(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = 0.5 * ce(STUDENT, LABELS) + 0.5 * ce(STUDENT, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_hard_other_alpha(alpha):
    loss = S.hard(alpha=alpha)(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = (1 - alpha) * ce(STUDENT, LABELS) + alpha * ce(STUDENT, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_hard_teacher_labels_not_smoothed():
    """Base criterion smooths (ε = 0.1); the teacher's labels must not be smoothed."""
    loss = S.hard()(T(STUDENT), labels(), T(TEACHER), LabelSmoothingCrossEntropy(0.1))
    expected = 0.5 * ls_ce(STUDENT, LABELS, 0.1) + 0.5 * ce(STUDENT, TEACHER_LABELS)
    wrong = 0.5 * ls_ce(STUDENT, LABELS, 0.1) + 0.5 * ls_ce(STUDENT, TEACHER_LABELS, 0.1)
    assert expected != pytest.approx(wrong, rel=1e-3)  # the test can tell them apart
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_hard_with_tuple_uses_class_head():
    loss = S.hard()((T(STUDENT), T(DIST)), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = 0.5 * ce(STUDENT, LABELS) + 0.5 * ce(STUDENT, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


# --------------------------------------------------------------------------
# token
# --------------------------------------------------------------------------


def test_token_flags():
    strat = S.token()
    assert strat.uses_dist_token is True
    assert strat.uses_teacher is True


def test_token_hard_default():
    loss = S.token()((T(STUDENT), T(DIST)), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = 0.5 * ce(STUDENT, LABELS) + 0.5 * ce(DIST, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_token_hard_alpha_and_smoothing(alpha):
    """(1−α)·base(cls, y) + α·CE(dist, argmax teacher); smoothing only on the labels."""
    strat = S.token(target="hard", alpha=alpha)
    loss = strat((T(STUDENT), T(DIST)), labels(), T(TEACHER), LabelSmoothingCrossEntropy(0.1))
    expected = (1 - alpha) * ls_ce(STUDENT, LABELS, 0.1) + alpha * ce(DIST, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("alpha, tau", [(0.5, 3.0), (0.1, 3.0), (0.4, 1.5)])
@pytest.mark.parametrize("reduction", ["batchmean", "official"])
def test_token_soft(alpha, tau, reduction):
    strat = S.token(target="soft", alpha=alpha, tau=tau, kl_reduction=reduction)
    loss = strat((T(STUDENT), T(DIST)), labels(), T(TEACHER), nn.CrossEntropyLoss())
    expected = (1 - alpha) * ce(STUDENT, LABELS) + alpha * soft_kd(DIST, TEACHER, tau, reduction)
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_token_rejects_plain_tensor(target):
    strat = S.token(target=target)
    with pytest.raises(TypeError):
        strat(T(STUDENT), labels(), T(TEACHER), nn.CrossEntropyLoss())


# --------------------------------------------------------------------------
# Mixup's soft labels (SoftTargetCrossEntropy base, hand-written targets)
# --------------------------------------------------------------------------


def test_none_with_mixup_targets():
    loss = S.none()((T(STUDENT), T(DIST)), T(MIXED), None, SoftTargetCrossEntropy())
    assert loss.item() == pytest.approx(soft_ce(STUDENT, MIXED), rel=REL)


@pytest.mark.parametrize("reduction", ["batchmean", "official"])
def test_soft_with_mixup_targets(reduction):
    strat = S.soft(alpha=0.1, tau=3.0, kl_reduction=reduction)
    loss = strat(T(STUDENT), T(MIXED), T(TEACHER), SoftTargetCrossEntropy())
    expected = 0.9 * soft_ce(STUDENT, MIXED) + 0.1 * soft_kd(STUDENT, TEACHER, 3.0, reduction)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_hard_with_mixup_targets():
    """Labels are the mixed/smoothed matrix; the teacher's stay one-hot argmax."""
    loss = S.hard()(T(STUDENT), T(MIXED), T(TEACHER), SoftTargetCrossEntropy())
    expected = 0.5 * soft_ce(STUDENT, MIXED) + 0.5 * ce(STUDENT, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_token_hard_with_mixup_targets():
    loss = S.token()((T(STUDENT), T(DIST)), T(MIXED), T(TEACHER), SoftTargetCrossEntropy())
    expected = 0.5 * soft_ce(STUDENT, MIXED) + 0.5 * ce(DIST, TEACHER_LABELS)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_token_soft_with_mixup_targets():
    strat = S.token(target="soft", alpha=0.5, tau=3.0)
    loss = strat((T(STUDENT), T(DIST)), T(MIXED), T(TEACHER), SoftTargetCrossEntropy())
    expected = 0.5 * soft_ce(STUDENT, MIXED) + 0.5 * soft_kd(DIST, TEACHER, 3.0, "batchmean")
    assert loss.item() == pytest.approx(expected, rel=REL)


# --------------------------------------------------------------------------
# Factory validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (S.soft, {"alpha": -0.1}),
        (S.soft, {"alpha": 1.1}),
        (S.soft, {"alpha": float("nan")}),
        (S.soft, {"tau": 0.0}),
        (S.soft, {"tau": -1.0}),
        (S.soft, {"kl_reduction": "mean"}),
        (S.soft, {"kl_reduction": "sum"}),
        (S.hard, {"alpha": -0.01}),
        (S.hard, {"alpha": 1.5}),
        (S.token, {"alpha": -0.5}),
        (S.token, {"alpha": 2.0}),
        (S.token, {"tau": 0.0}),
        (S.token, {"tau": -3.0}),
        (S.token, {"kl_reduction": "batch"}),
        (S.token, {"target": "medium"}),
        (S.token, {"target": "Hard"}),
    ],
)
def test_factory_rejects_bad_arguments(factory, kwargs):
    with pytest.raises(ValueError):
        factory(**kwargs)


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (S.soft, {"alpha": 0.0}),
        (S.soft, {"alpha": 1.0, "tau": 1e-3, "kl_reduction": "official"}),
        (S.hard, {"alpha": 0.0}),
        (S.hard, {"alpha": 1.0}),
        (S.token, {"target": "soft", "alpha": 1.0, "kl_reduction": "official"}),
        (S.token, {"target": "hard", "alpha": 0.0}),
    ],
)
def test_factory_accepts_boundaries(factory, kwargs):
    factory(**kwargs)


def test_registered_names():
    names = []
    S.register_strategies(lambda name, factory, help="": names.append((name, factory)))
    assert dict(names) == {"none": S.none, "soft": S.soft, "hard": S.hard, "token": S.token}


# --------------------------------------------------------------------------
# Gradients: token strategy routes the labels to cls, the teacher to dist
# --------------------------------------------------------------------------


def _grad_ce(logits, labels, weight):
    """d/dz of weight·mean CE: weight·(softmax − onehot)/B."""
    b = len(logits)
    return [
        [weight * (p - (1.0 if j == y else 0.0)) / b for j, p in enumerate(softmax(r))] for r, y in zip(logits, labels)
    ]


def _grad_soft_ce(logits, targets, weight):
    b = len(logits)
    return [[weight * (p - t) / b for p, t in zip(softmax(r), tr)] for r, tr in zip(logits, targets)]


def _grad_kd(student, teacher, tau, weight, denom):
    """d/dz_s of weight·τ²·KL(t/τ ‖ s/τ)/denom = weight·τ·(p_s − p_t)/denom."""
    out = []
    for s, t in zip(student, teacher):
        ps = softmax([v / tau for v in s])
        pt = softmax([v / tau for v in t])
        out.append([weight * tau * (a - b) / denom for a, b in zip(ps, pt)])
    return out


def test_token_hard_gradients_by_head():
    cls, dist = T(STUDENT, requires_grad=True), T(DIST, requires_grad=True)
    S.token(target="hard", alpha=0.5)((cls, dist), labels(), T(TEACHER), nn.CrossEntropyLoss()).backward()
    torch.testing.assert_close(cls.grad, T(_grad_ce(STUDENT, LABELS, 0.5)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dist.grad, T(_grad_ce(DIST, TEACHER_LABELS, 0.5)), rtol=1e-9, atol=1e-12)


def test_token_soft_gradients_by_head():
    alpha, tau = 0.4, 2.0
    cls, dist = T(STUDENT, requires_grad=True), T(DIST, requires_grad=True)
    strat = S.token(target="soft", alpha=alpha, tau=tau)
    strat((cls, dist), labels(), T(TEACHER), nn.CrossEntropyLoss()).backward()
    torch.testing.assert_close(cls.grad, T(_grad_ce(STUDENT, LABELS, 1 - alpha)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dist.grad, T(_grad_kd(DIST, TEACHER, tau, alpha, 2)), rtol=1e-9, atol=1e-12)


def test_token_gradients_with_mixup_targets():
    cls, dist = T(STUDENT, requires_grad=True), T(DIST, requires_grad=True)
    S.token()((cls, dist), T(MIXED), T(TEACHER), SoftTargetCrossEntropy()).backward()
    torch.testing.assert_close(cls.grad, T(_grad_soft_ce(STUDENT, MIXED, 0.5)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dist.grad, T(_grad_ce(DIST, TEACHER_LABELS, 0.5)), rtol=1e-9, atol=1e-12)


def test_token_heads_are_isolated():
    """Changing the labels leaves dist.grad unchanged; changing the teacher leaves cls.grad unchanged."""

    def grads(y, teacher):
        cls, dist = T(STUDENT, requires_grad=True), T(DIST, requires_grad=True)
        S.token()((cls, dist), torch.tensor(y), T(teacher), nn.CrossEntropyLoss()).backward()
        return cls.grad, dist.grad

    cls_a, dist_a = grads(LABELS, TEACHER)
    cls_b, dist_b = grads([1, 1], TEACHER)  # other labels
    cls_c, dist_c = grads(LABELS, [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # other teacher argmax
    torch.testing.assert_close(dist_a, dist_b, rtol=0, atol=0)
    assert not torch.allclose(cls_a, cls_b)
    torch.testing.assert_close(cls_a, cls_c, rtol=0, atol=0)
    assert not torch.allclose(dist_a, dist_c)


def test_token_alpha_zero_gives_no_dist_gradient():
    cls, dist = T(STUDENT, requires_grad=True), T(DIST, requires_grad=True)
    S.token(alpha=0.0)((cls, dist), labels(), T(TEACHER), nn.CrossEntropyLoss()).backward()
    assert dist.grad is None or torch.count_nonzero(dist.grad) == 0
    torch.testing.assert_close(cls.grad, T(_grad_ce(STUDENT, LABELS, 1.0)), rtol=1e-9, atol=1e-12)
