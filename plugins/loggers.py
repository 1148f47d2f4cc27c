"""Loggers: TensorBoard, MLflow and Weights & Biases (each an optional extra).

Each factory imports its tracker's package (a missing one is reported at start-up with the
extra to install) and opens nothing: files and runs are opened in ``log_hparams``.
Figures are named ``step/<name>`` (every ``[run] log_every`` updates, x axis: updates),
``epoch/<name>`` (x axis: epochs) and ``final/<name>``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import deitctl
from deitctl.api import Logger, Register


def _require(module: str, extra: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{exc}; install it with: pip install 'deitctl[{extra}]'") from exc


class TensorBoardLogger(Logger):
    """Event files in ``OUTPUT_DIR/tensorboard`` (``tensorboard --logdir OUTPUT_DIR``)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None
        self.params: dict[str, Any] = {}

    def log_hparams(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.params = SummaryWriter(log_dir=str(self.log_dir)), params
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("recipe", f"| key | value |\n|---|---|\n{table}")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def log_final(self, metrics: dict[str, float]) -> None:
        # the HParams dashboard: the recipe against the results, in the same folder
        self.writer.add_hparams(self.params, {f"final/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_logger(*, output_dir: str) -> Logger:
    """TensorBoard event files in OUTPUT_DIR/tensorboard."""
    _require("tensorboard", "tensorboard")
    return TensorBoardLogger(Path(output_dir) / "tensorboard")


class MlflowLogger(Logger):
    """A run in ``MLFLOW_TRACKING_URI``, by default an SQLite store in ``OUTPUT_DIR/mlflow.db``."""

    RUN_ID_FILE = "mlflow-run-id"

    def __init__(self, output_dir: Path, run_name: str, resume: bool) -> None:
        self.output_dir, self.run_name, self.resume = output_dir, run_name, resume
        self.client: Any = None
        self.run_id = ""
        self.finished = False

    def log_hparams(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"
        quiet = [logging.getLogger(n) for n in ("mlflow", "alembic")]
        levels = [q.level for q in quiet]
        for q in quiet:  # creating the SQLite store logs its schema migrations
            q.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "deitctl")
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = (self.output_dir / "mlartifacts").resolve().as_uri() if local else None
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        id_file = self.output_dir / self.RUN_ID_FILE
        if self.resume and id_file.is_file():  # carry on with the same MLflow run
            self.run_id = id_file.read_text(encoding="utf-8").strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        id_file.write_text(self.run_id + "\n", encoding="utf-8")
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _metrics(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", v, now, step) for k, v in metrics.items()])

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics("step", step, metrics)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._metrics("epoch", epoch, metrics)

    def log_final(self, metrics: dict[str, float]) -> None:
        self._metrics("final", 0, metrics)
        self.finished = True

    def close(self) -> None:
        if self.client is not None and self.run_id:
            # a run stopped early (Ctrl-C, a failure) can be resumed: KILLED, not FAILED
            self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "KILLED")


def mlflow_logger(*, output_dir: str, run_name: str, resume: bool) -> Logger:
    """MLflow: MLFLOW_TRACKING_URI, or an SQLite store in OUTPUT_DIR/mlflow.db."""
    _require("mlflow", "mlflow")
    return MlflowLogger(Path(output_dir), run_name, resume)


class WandbLogger(Logger):
    """A Weights & Biases run, offline by default (``WANDB_MODE=online`` streams it)."""

    def __init__(self, output_dir: Path, run_name: str, recipe: dict[str, Any], resume: bool) -> None:
        self.output_dir, self.run_name, self.recipe, self.resume = output_dir, run_name, recipe, resume
        self.run: Any = None

    def log_hparams(self, params: dict[str, Any]) -> None:
        import wandb

        id_file = self.output_dir / "wandb-run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if self.resume and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deitctl"),
            name=self.run_name,
            dir=str(self.output_dir),
            config=self.recipe,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(self.run.id + "\n", encoding="utf-8")
        self.run.define_metric("step/update")
        self.run.define_metric("step/*", step_metric="step/update")
        self.run.define_metric("epoch/epoch")
        self.run.define_metric("epoch/*", step_metric="epoch/epoch")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step/update": step, **{f"step/{k}": v for k, v in metrics.items()}})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({"epoch/epoch": epoch, **{f"epoch/{k}": v for k, v in metrics.items()}})

    def log_final(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.run.summary[f"final/{key}"] = value

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def wandb_logger(*, output_dir: str, run_name: str, recipe: dict[str, Any], resume: bool) -> Logger:
    """Weights & Biases, offline unless WANDB_MODE says otherwise (wandb sync OUTPUT_DIR/wandb/...)."""
    _require("wandb", "wandb")
    return WandbLogger(Path(output_dir), run_name, recipe, resume)


@deitctl.hookimpl
def register_loggers(register: Register) -> None:
    register("tensorboard", tensorboard_logger, help="TensorBoard event files in OUTPUT_DIR/tensorboard")
    register("mlflow", mlflow_logger, help="MLflow run (MLFLOW_TRACKING_URI, default sqlite:///OUTPUT_DIR/mlflow.db)")
    register("wandb", wandb_logger, help="Weights & Biases run, offline unless WANDB_MODE=online")
