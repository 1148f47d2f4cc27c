"""The learning-rate schedule per epoch: deitctl's "epoch" interval and the official code's."""

from __future__ import annotations

import pytest
from conftest import RECIPES, cli, read_metrics, set_args

TINY = [
    'data.dataset="synthetic"',
    "data.img_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.num_classes=10",
    "data.length=16",
    "data.repeated_aug=1",
    'student.model="deit_tiny_patch16_224"',
    "student.depth=1",
    "student.embed_dim=32",
    "student.num_heads=2",
    "student.patch_size=8",
    'distillation.strategy="none"',
    "run.progress=none",
    "run.epochs=4",
    "schedule.warmup_epochs=2",
    "schedule.warmup_lr=1e-6",
    "schedule.min_lr=1e-5",
    "optimizer.lr=1e-3",
    'optimizer.lr_scaling="none"',
    "ema.enabled=false",
]


def _sched(t: int) -> float:
    """timm's cosine schedule over 4 epochs with 2 warm-up epochs (no warm-up prefix), at
    epoch t, computed independently."""
    import math

    if t < 2:
        return 1e-6 + t * (1e-3 - 1e-6) / 2
    return 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 4))


@pytest.mark.parametrize(("interval", "shift"), [("epoch", 0), ("official", 1)])
def test_epoch_e_trains_at_sched_e_or_as_the_official_code_at_sched_e_minus_1(interval, shift, tmp_path):
    out = tmp_path / interval
    code, output = cli(
        "train", str(RECIPES / "quickstart.toml"), "-o", str(out), *set_args([*TINY, f'schedule.interval="{interval}"'])
    )
    assert code == 0, output
    lrs = [row["lr"] for row in read_metrics(out)]
    expected = [_sched(max(e - shift, 0)) for e in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9), (lrs, expected)
    if interval == "official":
        assert lrs[0] == lrs[1] == pytest.approx(1e-6)  # the first two epochs both at warmup_lr
    assert f'interval = "{interval}"' in (out / "recipe.toml").read_text()
