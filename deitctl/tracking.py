"""Logger plugins (``[run] loggers``): built at start-up on the main process, fed by the
training loop's :class:`~deitctl.events.Reporter` events.

:class:`LoggerReporter` turns the events into the :class:`deitctl.api.Logger` calls: the
resolved recipe first (``log_hparams``), the loss, lr, images/s and fp16 scale every
``[run] log_every`` updates (``log_step``), each epoch's metrics (``log_epoch``) and the
results of a finished run (``log_final``). A logger that fails during the run is switched
off with a warning; the run goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from deitctl.api import Logger
from deitctl.errors import RecipeError
from deitctl.events import Fanout, Reporter
from deitctl.recipe import Recipe

Say = Callable[[str], None]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def flat_params(recipe: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` with booleans, numbers and strings; lists as JSON text."""
    out: dict[str, Any] = {}
    for section, values in recipe.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def build_loggers(recipe: Recipe, *, resume: bool = False) -> list[tuple[str, Logger]]:
    """Call each ``[run] loggers`` factory; a missing package or a failing factory is a
    recipe error at ``run.loggers`` (exit code 2), before anything is trained."""
    from deitctl.factories import call_factory
    from deitctl.registry import get_registry

    context = {
        "output_dir": str(recipe.output_dir),
        "run_name": recipe.run.name,
        "recipe": recipe.to_dict(),
        "resume": resume,
    }
    built: list[tuple[str, Logger]] = []
    for name in recipe.run.loggers:
        plugin = get_registry().get("loggers", name)
        try:
            logger = call_factory(plugin, context, {}, recipe, "run.loggers", passthrough=(ImportError,))
        except ImportError as exc:
            for _, other in built:
                other.close()
            raise RecipeError(
                f"logger plugin {name!r} ({plugin.provider}) needs a package that is not installed: {exc}",
                source=recipe.source,
                key="run.loggers",
            ) from exc
        built.append((name, logger))
    return built


class LoggerReporter(Reporter):
    """Reporter events to logger plugins (the main process only)."""

    def __init__(self, loggers: list[tuple[str, Logger]], recipe: Recipe | None, say: Say) -> None:
        self.loggers, self.say = list(loggers), say
        self.params = flat_params(recipe.to_dict()) if recipe is not None else {}
        self.started = False
        self._reset_window()

    def _reset_window(self) -> None:
        self.loss_sum, self.images, self.since = 0.0, 0, time.perf_counter()

    def _begin(self) -> None:
        if not self.started:  # the run has begun: the recipe goes first
            self.started = True
            self._send("log_hparams", self.params)

    def _call(self, method: str, *args: Any) -> None:
        self._begin()
        self._send(method, *args)

    def _send(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers):
            fn = getattr(logger, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as exc:
                if method == "close":
                    self.say(f"warning: logger {name!r} failed to close: {type(exc).__name__}: {exc}")
                    continue
                self.loggers.remove((name, logger))
                self.say(
                    f"warning: logger {name!r} failed in {method} ({type(exc).__name__}: {exc}); "
                    "it is off for the rest of the run"
                )

    def log(self, message: str) -> None:
        self._begin()

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._reset_window()

    def step(self, images: int, loss: float, lr: float) -> None:
        self.loss_sum += loss * images
        self.images += images

    def update(self, num_updates: int, figures: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.since
        metrics = {"train_loss": self.loss_sum / max(self.images, 1), **figures}
        metrics["images_per_s"] = self.images / max(elapsed, 1e-9)
        self._reset_window()
        self._call("log_step", num_updates, {k: float(v) for k, v in metrics.items()})

    def epoch_end(self, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if k != "epoch" and _number(v)}
        self._call("log_epoch", int(metrics["epoch"]), numbers)
        self._reset_window()  # evaluation time is not training time

    def final(self, metrics: dict[str, Any]) -> None:
        self._call("log_final", {k: float(v) for k, v in metrics.items() if _number(v)})

    def close(self) -> None:
        self._send("close")
        self.loggers = []


def close_loggers(loggers: list[tuple[str, Logger]], say: Say) -> None:
    """Close loggers that no run took over (it failed before training)."""
    LoggerReporter(loggers, None, say).close()


def with_loggers(reporter: Reporter, loggers: list[tuple[str, Logger]], recipe: Recipe, say: Say) -> Reporter:
    """``reporter``, and the loggers (when there are any) fed from the same events."""
    return Fanout(reporter, LoggerReporter(loggers, recipe, say)) if loggers else reporter
