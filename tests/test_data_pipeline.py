"""The decoded-image cache and batch-level ToTensor/Normalize change no value:
batches are bit for bit those of the plain per-image pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from deitctl.batches import ErasePatches
from deitctl.data import ToUint8Tensor, make_loader, per_class_subset
from deitctl.image_cache import DecodedImages, cache_decoded
from deitctl_plugins.augmentations import deit, simple
from deitctl_plugins.datasets import _rgb_loader, imagefolder

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """A few real CIFAR-10 images per class, plus images in other modes and sizes."""
    root = tmp_path / "data"
    for cls in ("airplane", "cat"):
        dst = root / "train" / cls
        dst.mkdir(parents=True)
        for src in sorted((SAMPLE / "train" / cls).iterdir())[:10]:
            shutil.copy(src, dst / src.name)
    rgb = np.asarray(Image.open(next((root / "train" / "cat").iterdir())).convert("RGB"))
    Image.fromarray(rgb[..., 0]).save(root / "train" / "cat" / "gray.png")  # L
    rgba = np.dstack([rgb, np.linspace(0, 255, rgb.size // 3, dtype=np.uint8).reshape(rgb.shape[:2])])
    Image.fromarray(rgba, "RGBA").save(root / "train" / "cat" / "alpha.png")  # RGBA: composited on black
    Image.fromarray(np.tile(rgb, (2, 3, 1))).save(root / "train" / "airplane" / "wide.png")  # 64 x 96
    return root


def _reference(dataset):
    """The same dataset with the transform hidden from the loader's optimisations."""
    dataset.transform = T.Compose([dataset.transform])  # a Compose ending in a Compose: left as is
    return dataset


def _batches(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_the_cache_gives_the_loaders_pixels(small_tree):
    ds = imagefolder(root=str(small_tree), split="train")
    paths = [p for p, _ in ds.samples]
    (small_tree / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    cache = DecodedImages(_rgb_loader, paths + [str(small_tree / "train" / "cat" / "broken.jpg")], threads=2)
    assert len(cache) == len(paths) and cache.uncached == 1
    assert cache.nbytes == sum(np.asarray(_rgb_loader(p)).size for p in paths)
    for p in paths:
        a, b = cache(p), _rgb_loader(p)
        assert (a.mode, a.size, a.tobytes()) == (b.mode, b.size, b.tobytes())
    first = cache(paths[0])
    first.paste((255, 0, 0), (0, 0, 8, 8))  # a caller changing its image leaves the cache alone
    assert cache(paths[0]).tobytes() == _rgb_loader(paths[0]).tobytes()
    with pytest.raises(OSError):  # left to the loader, which reports it as before
        cache(str(small_tree / "train" / "cat" / "broken.jpg"))


def test_images_in_other_modes_are_left_to_the_loader(small_tree):
    def loader(path):
        img = _rgb_loader(path)
        return img.convert("P") if "gray" in path else img

    paths = [str(p) for p in sorted((small_tree / "train" / "cat").iterdir())]
    cache = DecodedImages(loader, paths)
    assert cache.uncached == 1 and len(cache) == len(paths) - 1
    gray = next(p for p in paths if "gray" in p)
    assert cache(gray).mode == "P" and cache(gray).tobytes() == loader(gray).tobytes()


def test_cache_decoded_respects_the_limit_and_the_subset(small_tree):
    ds = imagefolder(root=str(small_tree), split="train")
    assert "not cached" in cache_decoded(ds, limit_mb=0.001) and ds.loader is _rgb_loader
    assert cache_decoded(ds, limit_mb=0) == "" and ds.loader is _rgb_loader
    subset = per_class_subset(ds, 3)
    note = cache_decoded(subset, limit_mb=64)
    assert note.startswith("6 images decoded into RAM") and isinstance(ds.loader, DecodedImages)
    assert len(ds.loader) == 6
    assert cache_decoded(subset, limit_mb=64) == ""  # already cached


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("augmentation", ["simple", "deit"])
def test_batches_are_bitwise_those_of_the_per_image_pipeline(small_tree, workers, augmentation):
    """Cache and uint8 batches on, against the plain pipeline with no workers,
    for two epochs of seeded random augmentation and for evaluation."""
    factory = {"simple": simple, "deit": deit}[augmentation]
    aug = factory(img_size=32, mean=MEAN, std=STD, num_classes=2)
    fast_train = imagefolder(root=str(small_tree), split="train", transform=aug.train_transform)
    fast_eval = imagefolder(root=str(small_tree), split="train", transform=aug.eval_transform)
    for ds in (fast_train, fast_eval):
        assert cache_decoded(ds, limit_mb=64)
    aug = factory(img_size=32, mean=MEAN, std=STD, num_classes=2)
    slow_train = _reference(imagefolder(root=str(small_tree), split="train", transform=aug.train_transform))
    slow_eval = _reference(imagefolder(root=str(small_tree), split="train", transform=aug.eval_transform))
    args = dict(batch_size=8, seed=3)
    fast = make_loader(fast_train, train=True, num_workers=workers, **args)
    slow = make_loader(slow_train, train=True, num_workers=0, **args)
    # both training transforms end in ToTensor + Normalize (deit's then random erasing,
    # deferred to the batch): their batches travel as bytes
    assert fast.finish is not None and slow.finish is None
    assert isinstance(fast_train.transform.transforms[-1], ToUint8Tensor)
    assert (fast.finish.erasing is not None) == (augmentation == "deit")
    for epoch in (0, 1):
        a, b = _batches(fast, epoch), _batches(slow, epoch)
        assert len(a) == len(b) == 2  # 23 images, whole batches of 8
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    fast_e = make_loader(fast_eval, train=False, num_workers=workers, **args)
    slow_e = make_loader(slow_eval, train=False, num_workers=0, **args)
    for (xa, ya), (xb, yb) in zip(_batches(fast_e), _batches(slow_e), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("remode, recount", [("pixel", 1), ("pixel", 3), ("rand", 2), ("const", 1)])
def test_erasing_deferred_to_the_batch_is_bitwise_the_per_image_erasing(small_tree, workers, remode, recount):
    """The paper's augmentation at 64 px (random-resized crop, RandAugment) with erasing on
    every image: the rectangles and noise decided in the workers, written into the batch."""
    kw = dict(img_size=64, mean=MEAN, std=STD, num_classes=2, reprob=1.0, remode=remode, recount=recount)
    fast = imagefolder(root=str(small_tree), split="train", transform=deit(**kw).train_transform)
    slow = _reference(imagefolder(root=str(small_tree), split="train", transform=deit(**kw).train_transform))
    fast_loader = make_loader(fast, batch_size=8, train=True, seed=5, num_workers=workers)
    slow_loader = make_loader(slow, batch_size=8, train=True, seed=5, num_workers=0)
    assert fast_loader.finish is not None and fast_loader.finish.erasing is not None and slow_loader.finish is None
    for (xa, ya), (xb, yb) in zip(_batches(fast_loader, 1), _batches(slow_loader, 1), strict=True):
        assert xa.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    raw = list(DataLoader.__iter__(fast_loader))  # as the batches cross: bytes, and the rectangles
    assert all(x.dtype == torch.uint8 and isinstance(p, ErasePatches) for x, _, p in raw)
    assert sum(len(p) for *_, p in raw) >= len(raw) * 8  # every image erased at least once


def test_a_batch_mixing_8_bit_and_float_images(small_tree):
    """Images ToTensor does not scale by 255 keep the original steps, in the same batch."""

    def loader(path):
        img = _rgb_loader(path)
        return img.convert("L").convert("F") if "gray" in path else img.convert("L")

    def transform():
        return T.Compose([T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.25,))])

    fast = imagefolder(root=str(small_tree), split="train", transform=transform())
    slow = _reference(imagefolder(root=str(small_tree), split="train", transform=transform()))
    fast.loader = slow.loader = loader
    a = _batches(make_loader(fast, batch_size=32, train=False, seed=0, num_workers=0))
    b = _batches(make_loader(slow, batch_size=32, train=False, seed=0, num_workers=0))
    assert len(a) == 1 and torch.equal(a[0][0], b[0][0])


def test_training_logs_the_cache(tmp_path):
    from typer.testing import CliRunner

    from deitctl.cli import app

    sets = [
        f"data.root={json.dumps(str(SAMPLE))}",
        "data.train_per_class=4",
        "data.val_per_class=2",
        "data.num_workers=0",
        "data.batch_size=8",
        "run.progress=none",
        "run.epochs=1",
        "student.channels=[8, 16, 32, 64]",
    ]

    def train(out: str, *extra: str):
        args = ["train", str(ROOT / "recipes/quickstart_teacher.toml"), "-o", str(tmp_path / out)]
        for s in sets + list(extra):
            args += ["--set", s]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return result.output

    output = train("cached")
    assert "train split: 40 images decoded into RAM" in output
    assert "val split: 20 images decoded into RAM" in output
    assert "decoded into RAM" not in train("uncached", "data.cache_mb=0")


def test_no_cache_beyond_a_quarter_of_the_available_memory(small_tree, monkeypatch):
    import deitctl.image_cache as image_cache

    ds = imagefolder(root=str(small_tree), split="train")
    monkeypatch.setattr(image_cache, "available_memory_mb", lambda: 0.01)
    assert "over a quarter of the 0 MB of memory available" in cache_decoded(ds, limit_mb=64)
    assert ds.loader is _rgb_loader


def test_batches_are_finished_on_the_training_device(small_tree):
    """On a GPU the bytes cross to the device and are normalised there; the meta
    device stands in for CUDA (same code path, no values)."""
    aug = simple(img_size=32, mean=MEAN, std=STD, num_classes=2)
    ds = imagefolder(root=str(small_tree), split="train", transform=aug.eval_transform)
    loader = make_loader(ds, batch_size=8, train=False, seed=0, num_workers=0, device=torch.device("meta"))
    images, targets = next(iter(loader))
    assert images.device.type == "meta" and images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
    assert targets.device.type == "cpu"  # the training step moves targets itself
    assert make_loader(ds, batch_size=8, train=False, seed=0, num_workers=0, device=torch.device("cpu")).device is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_finished_on_cuda_equal_those_finished_on_the_cpu(small_tree):
    aug = simple(img_size=32, mean=MEAN, std=STD, num_classes=2)
    gpu = make_loader(
        imagefolder(root=str(small_tree), split="train", transform=aug.eval_transform),
        batch_size=8,
        train=False,
        seed=0,
        num_workers=2,
        pin_memory=True,
        device=torch.device("cuda"),
    )
    cpu = make_loader(
        imagefolder(root=str(small_tree), split="train", transform=aug.eval_transform),
        batch_size=8,
        train=False,
        seed=0,
        num_workers=0,
    )
    for (xg, yg), (xc, yc) in zip(_batches(gpu), _batches(cpu), strict=True):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg, yc)
