"""The training loop on the real loader against the in-memory training step, in one process.

For each variant (a list of recipe overrides) a Trainer is built once. Each round
runs one epoch of the real loader (its workers, transforms, cache), a chunk of
``--chunk`` steps at a time, each chunk followed by as many in-memory steps
(batches drawn from the loader beforehand and kept, as ``deitctl benchmark``
does). Both use ``Trainer.train_step``, the engine's step. The ratio is the real
loop's images/s over the in-memory step's, both summed over the epoch: the two
alternate every second or so, so the machine's speed changes (this shared CPU
moves by 25 % from one minute to the next) fall on both alike. In the steady
state the loader's queue is full (it is many times faster than the step), so the
in-memory chunks give the workers no head start beyond topping it up.

``--whole-epochs`` times ``Trainer.train_one_epoch`` instead (the engine's own
loop, reporter and all), between two runs of in-memory steps.

    python benchmarks/epoch_vs_step.py recipes/quickstart.toml --rounds 3 \\
        --variant "" --variant "data.num_workers=0" --variant "data.cache_mb=0"

Nothing is written to the recipe's output directory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deitctl.benchmark import _prepare, draw_batches
from deitctl.events import StopRequest
from deitctl.recipe import load_recipe
from deitctl.trainer import Trainer


def in_memory(trainer: Trainer, batches: list, steps: int, first: int = 0) -> tuple[int, float]:
    """``steps`` training steps on the kept batches; returns (images, seconds)."""
    started, images = time.perf_counter(), 0
    for i in range(first, first + steps):
        x, y = batches[i % len(batches)]
        trainer.train_step(x.clone(), y.clone(), step=i)  # Mixup works in place: keep the kept batch intact
        images += x.shape[0]
    return images, time.perf_counter() - started


def interleaved(trainer: Trainer, batches: list, epoch: int, chunk: int) -> tuple[float, float]:
    """One epoch of the real loader in chunks of ``chunk`` steps, each followed by
    as many in-memory steps; returns (real-loader images/s, in-memory images/s)."""
    loader = trainer.parts.train_loader
    loader.sampler.set_epoch(epoch)
    trainer.student.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    real = [0, 0.0]
    memory = [0, 0.0]
    batch_iter, step = iter(loader), 0
    while True:
        started, done = time.perf_counter(), 0
        for images, targets in batch_iter:
            trainer.train_step(images, targets, epoch=epoch, step=step)
            real[0] += images.shape[0]
            step, done = step + 1, done + 1
            if done == chunk:
                break
        real[1] += time.perf_counter() - started
        if done:
            n, seconds = in_memory(trainer, batches, done, first=step)
            memory[0] += n
            memory[1] += seconds
        if done < chunk:
            return real[0] / real[1], memory[0] / memory[1]


def whole_epoch(trainer: Trainer, batches: list, epoch: int, steps: int) -> tuple[float, float]:
    """``Trainer.train_one_epoch`` between two runs of ``steps`` in-memory steps."""
    trainer.student.train()
    before = in_memory(trainer, batches, steps)
    rate = trainer.train_one_epoch(epoch, StopRequest())["images_per_s"]
    after = in_memory(trainer, batches, steps)
    return rate, (before[0] + after[0]) / (before[1] + after[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="comma-separated KEY=VALUE overrides ('' for the recipe as is); repeatable",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8, help="real-loader steps between in-memory chunks")
    parser.add_argument(
        "--whole-epochs",
        type=int,
        default=0,
        metavar="STEPS",
        help="time train_one_epoch between STEPS in-memory steps instead of interleaving",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant if args.variant is not None else [""]
    trainers = {}
    for v in variants:
        name = v or "the recipe"
        overrides = ["run.progress=none"] + [o.strip() for o in v.split(",") if o.strip()]
        trainer = Trainer(_prepare(load_recipe(args.recipe, overrides), print))
        for note in trainer.parts.notes:
            print(f"[{name}] {note}")
        batches, data_rate = draw_batches(trainer.parts.train_loader, 30, keep=8)
        print(f"[{name}] loader alone {data_rate:,.0f} img/s, batches of {batches[0][0].dtype}")
        trainer.student.train()
        in_memory(trainer, batches, 3)  # warm-up
        trainers[name] = (trainer, batches)
    ratios: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name, (trainer, batches) in trainers.items():
            if args.whole_epochs:
                real, memory = whole_epoch(trainer, batches, r, args.whole_epochs)
            else:
                real, memory = interleaved(trainer, batches, r, args.chunk)
            ratios[name].append(real / memory)
            print(
                f"round {r + 1} [{name}]: real loader {real:.0f} img/s, in-memory {memory:.0f} img/s"
                f" -> {ratios[name][-1]:.3f}",
                flush=True,
            )
    print("\n| variant | real loader ÷ in-memory step, per round | median |\n|---|---|---:|")
    for name, values in ratios.items():
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in values)} | {statistics.median(values):.2f} |")
    for trainer, _ in trainers.values():
        trainer.close()


if __name__ == "__main__":
    main()
