"""The training loader at ImageNet scale: images/s per core at 224 px with the paper's
augmentation (``recipes/regnet_to_deit_s.toml``'s ``[augmentation]``: RandomResizedCrop,
flip, RandAugment m9, random erasing 0.25), side by side in one run:

- ``folder``: a JPEG ImageFolder through deitctl's loader (``imagefolder``, image cache off,
  as for ImageNet, which does not fit in RAM);
- ``shards``: the same images packed with ``deitctl data pack``, read by index;
- ``shards320``: packed with ``--max-side 320``;
- ``plain``: torchvision's ``ImageFolder`` + ``timm.data.create_transform`` + a plain
  ``DataLoader`` (shuffle, default collation), the same settings.

The images: CIFAR-10 training images from ``../shared/data/cifar10-jpeg.tar.gz`` upscaled
to 500x375 with film grain (so that their JPEG files are about the size of ImageNet's),
saved as JPEG at quality 90. Variants run in turn, round after round in a rotated order,
so that a shared machine's load falls on all alike; the median of each is reported.

    python benchmarks/loader.py [--images 320] [--rounds 5] [--workers 2] [--profile] [--json]

``--profile``: the CPU time of each stage in this process (decode, crop, flip, RandAugment, ToTensor,
Normalize, erasing, then the batch: collation, and for deitctl the batch-level finish) for
each source and pipeline instead.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = (500, 375)


def _small_images(source: Path) -> Iterator[tuple[str, bytes]]:
    """(class, JPEG bytes) of the training images of a CIFAR-10 archive or ImageFolder."""
    if source.is_dir():
        for path in sorted(source.glob("train/*/*")):
            yield path.parent.name, path.read_bytes()
        return
    with tarfile.open(source) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "train" and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                yield parts[2], f.read()


def make_images(dest: Path, count: int, source: Path = ARCHIVE, grain: float = 24.0) -> dict[str, float]:
    """About ``count`` ImageNet-like JPEGs in ``dest/train/<class>/`` (and an eighth as many in
    ``val/``): CIFAR-10 images upscaled to 500x375, with film grain, at JPEG quality 90."""
    from PIL import Image

    per_class = max(1, count // 10)
    taken: dict[str, int] = {}
    rng = np.random.default_rng(0)
    sizes = []
    for cls, data in _small_images(source):
        n = taken.get(cls, 0)
        if n >= per_class:
            if len(taken) == 10 and min(taken.values()) >= per_class:
                break
            continue
        small = Image.open(io.BytesIO(data)).convert("RGB")
        big = np.asarray(small.resize(SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, grain, big.shape), 0, 255).astype(np.uint8)
        split = "val" if n < max(1, per_class // 8) else "train"
        out = dest / split / cls / f"{n:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).save(out, "JPEG", quality=90)
        sizes.append(out.stat().st_size)
        taken[cls] = n + 1
    return {"images": len(sizes), "mean_kb": statistics.mean(sizes) / 1024}


def augmentation() -> Any:
    """The paper's training augmentation at 224 px, through deitctl's ``deit`` plugin."""
    from deitctl_plugins.augmentations import deit

    options = tomllib.loads((ROOT / "recipes" / "regnet_to_deit_s.toml").read_text())["augmentation"]
    options.pop("plugin")
    return deit(img_size=224, mean=MEAN, std=STD, num_classes=10, **options)


def plain_transform() -> Any:
    """timm's create_transform with the same settings (what timm's train.py builds), with
    deitctl's fix for timm's posterize on Pillow 13 (which refuses 0 bits)."""
    from timm.data import create_transform

    from deitctl_plugins.augmentations import _patch_posterize

    _patch_posterize()
    return create_transform(
        224,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.3,
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=MEAN,
        std=STD,
    )


# --------------------------------------------------------------------------- the loaders


def deitctl_loader(kind: str, root: Path, workers: int, batch: int) -> Any:
    from deitctl.data import make_loader
    from deitctl.shards import open_split
    from deitctl_plugins.datasets import imagefolder

    transform = augmentation().train_transform
    ds = imagefolder(root=str(root), split="train", transform=transform) if kind == "folder" else None
    if ds is None:
        ds = open_split(str(root), "train", transform)
    return make_loader(ds, batch_size=batch, train=True, seed=0, num_workers=workers, repeats=1)


def plain_loader(root: Path, workers: int, batch: int) -> Any:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / "train"), transform=plain_transform())
    return DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(loader: Any, epoch: int) -> dict[str, float]:
    """One epoch: images/s (wall, from the second batch on: worker start-up left out), and
    images per CPU second of the workers and of the whole (workers + this process)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    iterator = iter(loader)
    workers = [w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]  # persistent workers
    cpu0 = {pid: _cpu_seconds(pid) for pid in workers}
    main0 = time.process_time()
    count, total, started = 0, 0, 0.0
    for i, (x, _) in enumerate(iterator):
        total += x.shape[0]
        if i == 0:
            started = time.perf_counter()
        else:
            count += x.shape[0]
    wall = time.perf_counter() - started
    worker_cpu = sum(_cpu_seconds(pid) - cpu0[pid] for pid in workers)
    main_cpu = time.process_time() - main0
    return {
        "wall": count / wall,
        "per_worker_cpu_s": total / max(worker_cpu, 1e-9),
        "per_cpu_s": total / (worker_cpu + main_cpu),
    }


def compare(work: Path, *, rounds: int, workers: int, batch: int) -> dict[str, list[dict[str, float]]]:
    loaders: dict[str, Any] = {
        "plain": plain_loader(work / "jpeg", workers, batch),
        "folder": deitctl_loader("folder", work / "jpeg", workers, batch),
        "shards": deitctl_loader("shards", work / "shards", workers, batch),
        "shards320": deitctl_loader("shards", work / "shards320", workers, batch),
    }
    names = list(loaders)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for name in names:  # warm-up: workers start, files in the page cache
        measure(loaders[name], 0)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(measure(loaders[name], r + 1))
    return runs


# --------------------------------------------------------------------------- stages


def _timed(stages: dict[str, float], name: str, fn: Callable[[Any], Any], x: Any) -> Any:
    t0 = time.thread_time()  # CPU time: what the stage costs, not the waits of a shared machine
    y = fn(x)
    stages[name] = stages.get(name, 0.0) + time.thread_time() - t0
    return y


STAGE_NAMES = {
    "RandomResizedCropAndInterpolation": "crop",
    "RandomHorizontalFlip": "flip",
    "RandAugment": "randaugment",
    "MaybeToTensor": "to_tensor",
    "ToTensor": "to_tensor",
    "ToUint8Tensor": "to_uint8+erasing",
    "Normalize": "normalize",
    "RandomErasing": "erasing",
}


def pipelines() -> dict[str, tuple[list[Any], Callable[[list[Any]], Any]]]:
    """(per-image steps, batch step) of deitctl's loader and of the plain one."""
    from types import SimpleNamespace

    from torch.utils.data import default_collate

    from deitctl.batches import Collate, ErasePatches, defer_normalize, finish_images

    class Holder(SimpleNamespace):
        def __len__(self) -> int:
            return 0

    holder = Holder(transform=augmentation().train_transform)
    last = defer_normalize(holder)
    assert last is not None
    collate = Collate(last)
    mean, std = torch.tensor(last.mean).view(1, -1, 1, 1), torch.tensor(last.std).view(1, -1, 1, 1)

    def deitctl_batch(samples: list[Any]) -> Any:  # the workers' collation, then the main process's finish
        images, targets, patches = collate(samples)
        assert isinstance(patches, ErasePatches)
        return patches.apply(finish_images(images, mean, std)), targets

    return {
        "deitctl": (list(holder.transform.transforms), deitctl_batch),
        "plain": (list(plain_transform().transforms), default_collate),
    }


def profile(
    source: Callable[[int], bytes], count: int, steps: list[Any], batch_step: Any, batch: int = 32
) -> dict[str, float]:
    """Milliseconds per image in each stage, in this process."""
    from deitctl.data import seed_sample
    from deitctl.images import load_rgb

    stages: dict[str, float] = {}
    samples = []
    for i in range(count):
        seed_sample(i)
        x = _timed(stages, "decode", lambda b: load_rgb(io.BytesIO(b)), source(i))
        for step in steps:
            x = _timed(stages, STAGE_NAMES.get(type(step).__name__, type(step).__name__), step, x)
        samples.append((x, 0))
        if len(samples) == batch:
            _timed(stages, "batch", batch_step, samples)
            samples = []
    done = count - len(samples)
    return {k: 1000 * v / (count if k != "batch" else done) for k, v in stages.items()}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    python = platform.python_version()
    return f"{model or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {python}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="Keep the images here (default: a temporary folder).")
    parser.add_argument(
        "--source", type=Path, default=ARCHIVE, help="CIFAR-10: the JPEG archive (default) or an ImageFolder."
    )
    parser.add_argument("--profile", action="store_true", help="Time each stage instead.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not (work / "jpeg" / "train").is_dir():
            made = make_images(work / "jpeg", args.images, args.source)
            print(
                f"made {made['images']} JPEGs of {SIZE[0]}x{SIZE[1]}, {made['mean_kb']:.0f} KB on average",
                file=sys.stderr,
            )
        from deitctl.pack import pack

        for name, side in (("shards", 0), ("shards320", 320)):
            if not (work / name / "manifest.json").is_file():
                pack(work / "jpeg", work / name, shard_mb=64, max_side=side)
        load = loadavg()
        if args.profile:
            result: dict[str, Any] = {"machine": machine(), "load": load, "ms_per_image": {}}
            from deitctl.shards import open_split

            files = sorted((work / "jpeg" / "train").glob("*/*.jpg"))
            sources: dict[str, Callable[[int], bytes]] = {"jpeg": lambda i: files[i % len(files)].read_bytes()}
            for name in ("shards", "shards320"):
                ds = open_split(str(work / name), "train", None)
                sources[name] = lambda i, ds=ds: ds.raw(i % len(ds))
            passes: dict[str, list[dict[str, float]]] = {}
            for _ in range(max(1, args.rounds)):  # alternated passes; the median of each stage is reported
                for name, read in sources.items():
                    for pipeline, (steps, batch_step) in pipelines().items():
                        if pipeline == "plain" and name != "jpeg":
                            continue
                        stages = profile(read, len(files), steps, batch_step, args.batch)
                        passes.setdefault(f"{pipeline} {name}", []).append(stages)
            result["ms_per_image"] = {
                key: {stage: statistics.median(p[stage] for p in runs) for stage in runs[0]}
                for key, runs in passes.items()
            }
        else:
            runs = compare(work, rounds=args.rounds, workers=args.workers, batch=args.batch)
            cores = min(args.workers, os.cpu_count() or 1) or 1
            medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
            for m in medians.values():
                m["wall_per_core"] = m["wall"] / cores
            result = {
                "machine": machine(),
                "load_before": load,
                "load_after": loadavg(),
                "workers": args.workers,
                "median": medians,
                "vs_plain": {name: {k: v / medians["plain"][k] for k, v in m.items()} for name, m in medians.items()},
                "runs": runs,
            }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(result["machine"])
    if args.profile:
        print(
            f"load average {' '.join(result['load'])}; CPU ms per image, one process (median of {args.rounds} passes)"
        )
        for source, stages in result["ms_per_image"].items():
            total = sum(stages.values())
            print(f"{source:>14}: " + "  ".join(f"{k} {v:.2f}" for k, v in stages.items()) + f"  total {total:.2f}")
        return
    print(
        f"load average before {' '.join(result['load_before'])}, after {' '.join(result['load_after'])}; "
        f"{result['workers']} workers; medians of {args.rounds} epochs, alternated; (÷ plain)"
    )
    print(f"{'':>10}  {'img/s per core (wall)':>21}  {'img per CPU s (all)':>20}  {'img per CPU s (workers)':>24}")
    for name, m in result["median"].items():
        r = result["vs_plain"][name]
        print(
            f"{name:>10}  {m['wall_per_core']:13.1f} ({r['wall']:.2f}x)  {m['per_cpu_s']:12.1f} ({r['per_cpu_s']:.2f}x)"
            f"  {m['per_worker_cpu_s']:16.1f} ({r['per_worker_cpu_s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
