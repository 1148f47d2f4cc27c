"""Logger plugins: TensorBoard, MLflow and W&B (offline) read back with their own readers
after a tiny real run; a third-party logger's calls; missing packages and unknown names."""

from __future__ import annotations

import glob
import json
import math
import struct
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import HOSTILE, SAMPLE, cli, read_metrics

from deitctl.registry import reset_registry

TINY = HOSTILE / "tiny.toml"
# a distilled student with a (random, small) teacher: per-head accuracies and agreement
DISTILLED = [
    'student.model="deit_tiny_distilled_patch16_224"',
    'distillation.strategy="token"',
    'teacher.plugin="timm"',
    'teacher.model="resnet18"',
    "teacher.channels=[8, 16, 32, 64]",
    "run.epochs=2",
    "run.log_every=1",
]


def train(out: Path, *sets: str) -> tuple[int, str]:
    args = ["train", str(TINY), "--output-dir", str(out), "--set", f"data.root={json.dumps(str(SAMPLE))}"]
    for item in sets:
        args += ["--set", item]
    return cli(*args)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run with all three built-in loggers."""
    out = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        code, text = train(out, *DISTILLED, 'run.loggers=["tensorboard", "mlflow", "wandb"]')
    finally:
        mp.undo()
    assert code == 0, text
    return out, read_metrics(out)


def _updates(metrics: list[dict]) -> int:
    return sum(m["train_images"] for m in metrics) // 8  # batch 8, accumulate 1


@pytest.mark.slow
def test_tensorboard_event_files_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, metrics = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"step/train_loss", "step/lr", "step/images_per_s"} <= scalars
    assert "step/scale" not in scalars  # fp32: no loss scale
    steps = [e.step for e in events.Scalars("step/train_loss")]
    assert steps == list(range(1, _updates(metrics) + 1))  # log_every = 1
    for key in ("acc1", "acc1_cls", "acc1_dist", "train_loss"):
        logged = [(e.step, round(e.value, 4)) for e in events.Scalars(f"epoch/{key}")]
        assert logged == [(m["epoch"], round(m[key], 4)) for m in metrics], key
    assert [e.value for e in events.Scalars("epoch/teacher_agreement")] == pytest.approx(
        [metrics[-1]["teacher_agreement"]]
    )
    assert events.Scalars("final/best_acc1")[0].value == pytest.approx(metrics[-1]["best_acc1"])
    assert "recipe/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_mlflow_run_read_back_with_its_client(tracked):
    from mlflow.tracking import MlflowClient

    out, metrics = tracked
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run((out / "mlflow-run-id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["distillation.strategy"] == "token"
    assert params["run.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    history = client.get_metric_history(run.info.run_id, "epoch/acc1_dist")
    assert [(h.step, round(h.value, 4)) for h in history] == [(m["epoch"], round(m["acc1_dist"], 4)) for m in metrics]
    steps = client.get_metric_history(run.info.run_id, "step/lr")
    assert sorted(h.step for h in steps) == list(range(1, _updates(metrics) + 1))
    assert run.data.metrics["final/best_acc1"] == pytest.approx(metrics[-1]["best_acc1"])


def _wandb_records(path: str) -> list:
    """The records of an offline ``.wandb`` file: a LevelDB-style log of protobuf records
    (32 KiB blocks; a 7-byte file header, then per chunk crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "a/b" may be stored as the nested key [a, b]


@pytest.mark.slow
def test_wandb_offline_run_files_read_back(tracked):
    out, metrics = tracked
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    records = _wandb_records(path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == "tiny" and runs[0].project == "deitctl"
    history = [
        {_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    epochs = [h for h in history if "epoch/acc1" in h]
    assert [(h["epoch/epoch"], round(h["epoch/acc1"], 4)) for h in epochs] == [
        (m["epoch"], round(m["acc1"], 4)) for m in metrics
    ]
    assert [h["step/update"] for h in history if "step/train_loss" in h] == list(range(1, _updates(metrics) + 1))
    updates = [i for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update]
    summary = {_key(i): json.loads(i.value_json) for i in updates}
    assert summary["final/best_acc1"] == pytest.approx(metrics[-1]["best_acc1"])


class Recorder:
    """A third-party logger: records its calls."""

    calls: ClassVar[list] = []

    def __init__(self, **context):
        Recorder.calls.append(("factory", context))

    def log_hparams(self, params):
        Recorder.calls.append(("hparams", params))

    def log_step(self, step, metrics):
        Recorder.calls.append(("step", step, metrics))

    def log_epoch(self, epoch, metrics):
        Recorder.calls.append(("epoch", epoch, metrics))

    def log_final(self, metrics):
        Recorder.calls.append(("final", metrics))

    def close(self):
        Recorder.calls.append(("close",))


class Broken:
    def log_epoch(self, epoch, metrics):
        raise ConnectionError("tracker unreachable")


@pytest.fixture
def third_party(monkeypatch):
    import deitctl

    module = types.ModuleType("deitctl_test_loggers")

    @deitctl.hookimpl
    def register_loggers(register):
        register(
            "recorder",
            lambda *, output_dir, run_name, recipe, resume: Recorder(
                output_dir=output_dir, run_name=run_name, recipe=recipe, resume=resume
            ),
            help="records calls",
        )
        register("broken", lambda: Broken(), help="fails")

    module.register_loggers = register_loggers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deitctl_test_loggers", module)
    monkeypatch.setenv("DEITCTL_PLUGINS", "deitctl_test_loggers")
    reset_registry()
    Recorder.calls = []
    yield
    reset_registry()


def test_a_third_party_logger_gets_the_recipe_steps_epochs_and_results(third_party, tmp_path, monkeypatch):
    out = tmp_path / "run"
    sets = ["run.epochs=2", "run.log_every=2", 'run.loggers=["recorder", "broken"]', 'run.precision="fp16"']
    code, text = train(out, *sets)
    assert code == 0, text
    assert "logger 'broken' failed in log_epoch (ConnectionError: tracker unreachable)" in text
    metrics = read_metrics(out)
    kinds = [c[0] for c in Recorder.calls]
    assert kinds[:2] == ["factory", "hparams"] and kinds[-2:] == ["final", "close"]
    context = Recorder.calls[0][1]
    assert context["output_dir"] == str(out) and context["run_name"] == "tiny" and context["resume"] is False
    assert context["recipe"]["optimizer"]["lr"] == 0.001
    assert Recorder.calls[1][1]["run.loggers"] == '["recorder", "broken"]'
    steps = [c for c in Recorder.calls if c[0] == "step"]
    assert [s[1] for s in steps] == list(range(2, _updates(metrics) + 1, 2))
    assert set(steps[0][2]) == {"train_loss", "lr", "images_per_s", "scale"}  # fp16: the loss scale too
    assert all(s[2]["scale"] > 0 and math.log2(s[2]["scale"]).is_integer() for s in steps)
    epochs = [c for c in Recorder.calls if c[0] == "epoch"]
    assert [(e[1], e[2]["acc1"]) for e in epochs] == [(m["epoch"], m["acc1"]) for m in metrics]
    final = Recorder.calls[-2][1]
    assert final["best_acc1"] == metrics[-1]["best_acc1"] and final["epochs"] == 2
    # using the checkpoint where the loggers are not installed: they are not needed
    monkeypatch.delenv("DEITCTL_PLUGINS")
    reset_registry()
    code, text = cli("eval", "--ckpt", str(out / "best.pt"), "--json")
    assert code == 0, text


def test_an_unknown_logger_is_a_recipe_error(tmp_path):
    code, text = cli("recipe", "validate", str(TINY), "--set", 'run.loggers=["tensorbord"]')
    assert code == 2
    assert "[run.loggers]" in text and "unknown logger plugin 'tensorbord'" in text
    assert "did you mean 'tensorboard'" in text


def test_a_missing_tracker_package_stops_the_run_at_start_up(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    out = tmp_path / "run"
    code, text = train(out, 'run.loggers=["mlflow"]')
    assert code == 2, text
    assert "[run.loggers]" in text and "logger plugin 'mlflow'" in text
    assert "pip install 'deitctl[mlflow]'" in " ".join(text.split())
    assert not (out / "metrics.jsonl").exists()
    code, text = cli("recipe", "validate", str(TINY), "--set", 'run.loggers=["mlflow"]')
    assert code == 2 and "pip install 'deitctl[mlflow]'" in " ".join(text.split())
