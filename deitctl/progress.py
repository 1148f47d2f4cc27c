"""Rich progress for training: a bar with images/s, ETA, loss and lr on a
terminal; plain lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deitctl.events import Reporter


def format_metrics(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']}", f"train_loss {m['train_loss']:.4f}", f"lr {m['lr']:.3g}"]
    for key in ("acc1", "acc5", "acc1_ema", "acc1_cls", "acc1_dist"):
        if key in m:
            parts.append(f"{key} {m[key]:.2f}")
    parts.append(f"{m['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class RichReporter(Reporter):
    def __init__(self, console: Console, mode: str = "auto", enabled: bool = True):
        self.console, self.enabled = console, enabled
        self.live = enabled and mode != "none" and (mode == "rich" or (mode == "auto" and console.is_terminal))
        self.plain = enabled and mode != "none" and not self.live
        self.progress: Progress | None = None
        self.task: Any = None
        self.images, self.started, self.last_print, self.step_no, self.steps = 0, 0.0, 0.0, 0, 0

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def _ensure(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        return self.progress

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.images, self.started, self.step_no, self.steps = 0, time.perf_counter(), 0, steps
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"
        if self.live:
            p = self._ensure()
            if self.task is not None:
                p.remove_task(self.task)
            self.task = p.add_task(self.epoch_label, total=steps, info="")

    def step(self, images: int, loss: float, lr: float) -> None:
        self.images += images
        self.step_no += 1
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {rate:.0f} img/s"
        if self.live and self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)
        elif self.plain and (time.perf_counter() - self.last_print > 10 or self.step_no == self.steps):
            self.last_print = time.perf_counter()
            self.console.print(f"{self.epoch_label} step {self.step_no}/{self.steps}  {info}", highlight=False)

    def eval_start(self, batches: int) -> None:
        if self.live and self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("evaluating", total=batches, info="")

    def eval_step(self, images: int) -> None:
        if self.live and self.progress is not None:
            self.progress.update(self.task, advance=1)

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            self.console.print(format_metrics(metrics), highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None
