"""What passes between the training loop and its surroundings: progress events out
(:class:`Reporter`), stop requests in (:class:`StopRequest`), and phase timings for
``deitctl benchmark`` (:class:`StepClock`)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Reporter:
    """Receives progress events; the CLI renders them with rich. Every method is optional."""

    def log(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, images: int, loss: float, lr: float) -> None: ...
    def epoch_end(self, metrics: dict[str, Any]) -> None: ...
    def eval_start(self, batches: int) -> None: ...
    def eval_step(self, images: int) -> None: ...
    def update(self, num_updates: int, figures: dict[str, float]) -> None:
        """Every ``[run] log_every`` optimizer updates: ``lr`` (of that update) and, with fp16, ``scale``."""

    def final(self, metrics: dict[str, Any]) -> None:
        """The results of a run that finished all its epochs."""

    def close(self) -> None: ...


class Fanout(Reporter):
    """Sends every event to each of several reporters, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def log(self, message: str) -> None:
        for r in self.reporters:
            r.log(message)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        for r in self.reporters:
            r.epoch_start(epoch, epochs, steps)

    def step(self, images: int, loss: float, lr: float) -> None:
        for r in self.reporters:
            r.step(images, loss, lr)

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        for r in self.reporters:
            r.epoch_end(metrics)

    def eval_start(self, batches: int) -> None:
        for r in self.reporters:
            r.eval_start(batches)

    def eval_step(self, images: int) -> None:
        for r in self.reporters:
            r.eval_step(images)

    def update(self, num_updates: int, figures: dict[str, float]) -> None:
        for r in self.reporters:
            r.update(num_updates, figures)

    def final(self, metrics: dict[str, Any]) -> None:
        for r in self.reporters:
            r.final(metrics)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class StopRequest:
    """SIGINT/SIGTERM: stop at the next optimizer update after saving; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepClock:
    """Adds up the time of named phases of the training step (``teacher``, ...).

    Off by default, at no cost; ``deitctl benchmark`` turns it on. On CUDA a timed phase is
    bracketed by two synchronisations, so kernels queued before it are not counted in it.
    """

    def __init__(self, device: torch.device | None = None, *, enabled: bool = False) -> None:
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started

    def reset(self) -> None:
        self.seconds.clear()
