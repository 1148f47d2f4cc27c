"""torchrun + DistributedDataParallel on CPU (gloo), and gradient accumulation:
both must match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, cli, invoke, read_metrics, torchrun_deitctl

pytestmark = pytest.mark.slow  # torchrun with 2 processes

COMMON = [
    f"data.root={json.dumps(str(SAMPLE))}",
    "data.train_per_class=4",
    "data.val_per_class=3",
    "data.num_workers=0",
    "data.repeated_aug=3",
    "run.epochs=2",
    "run.progress=plain",
    "ema.enabled=true",
    "ema.warmup=true",
    "student.depth=2",
    "student.embed_dim=32",
    "student.num_heads=2",
    "student.patch_size=8",
    "student.drop_path=0.0",
    "distillation.strategy=none",
    'student.model="deit_tiny_patch16_224"',
    "augmentation.plugin=simple",
    "schedule.warmup_epochs=1",
]


def _args(out: Path, overrides: list[str]) -> list[str]:
    sets = [x for item in COMMON + overrides for x in ("--set", item)]
    return ["train", str(ROOT / "recipes" / "quickstart.toml"), "--output-dir", str(out), *sets]


def _one_process(out: Path, overrides: list[str]) -> None:
    """The one-process runs go in this process (on one thread, as the torchrun workers)."""
    code, output = cli(*_args(out, overrides))
    assert code == 0, output[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    # the quickstart recipe has a teacher; strategy none leaves it unused
    _one_process(base / "single", ["data.batch_size=8"])
    torchrun = torchrun_deitctl()
    overrides = ["data.batch_size=4", 'run.loggers=["tensorboard"]', "run.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun, *_args(base / "ddp", overrides)]
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _one_process(base / "accumulate", ["data.batch_size=4", "optimizer.accumulate=2"])
    return base, ddp


def _close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key].float(), b[key].float(), atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_ddp_only_rank_0_sends_figures_to_the_loggers(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _ = runs
    files = list((base / "ddp" / "tensorboard").glob("events.out.tfevents.*"))
    assert files and len({f.name.rsplit(".", 2)[1] for f in files}) == 1  # one process id
    events = EventAccumulator(str(base / "ddp" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/acc1")] == [1, 2]
    metrics = read_metrics(base / "ddp")
    updates = sum(m["train_images"] for m in metrics) // 8  # global batch 2 x 4
    assert [e.step for e in events.Scalars("step/train_loss")] == list(range(1, updates + 1))


def test_ddp_logs_each_epoch_once_and_states_world_size(runs):
    base, ddp = runs
    assert [m["epoch"] for m in read_metrics(base / "ddp")] == [1, 2]
    assert "world size 2" in ddp.stderr
    assert ddp.stderr.count("epoch 1  train_loss") == 1  # rank 0 logs alone


def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    base, _ = runs
    single, ddp = read_metrics(base / "single"), read_metrics(base / "ddp")
    for s, d in zip(single, ddp):
        assert s["train_images"] == d["train_images"]
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert d["lr"] == pytest.approx(s["lr"], rel=1e-9)
        # distributed evaluation counts every image exactly once
        assert d["acc1"] == pytest.approx(s["acc1"], abs=1e-6) and d["loss"] == pytest.approx(s["loss"], rel=1e-4)
    a = torch.load(base / "single" / "last.pt", weights_only=True)
    b = torch.load(base / "ddp" / "last.pt", weights_only=True)
    _close(a["model"], b["model"])
    _close(a["model_ema"], b["model_ema"])


def test_gradient_accumulation_matches_a_larger_batch(runs):
    base, _ = runs
    a = torch.load(base / "single" / "last.pt", weights_only=True)
    b = torch.load(base / "accumulate" / "last.pt", weights_only=True)
    _close(a["model"], b["model"])
    single, acc = read_metrics(base / "single"), read_metrics(base / "accumulate")
    for s, d in zip(single, acc):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)


def test_ddp_checkpoint_evaluates_in_one_process(runs):
    base, _ = runs
    result = invoke("eval", "--ckpt", str(base / "ddp" / "best.pt"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 30
    best = max(m["acc1"] for m in read_metrics(base / "ddp"))
    assert metrics["acc1"] == pytest.approx(best, abs=1e-6)
