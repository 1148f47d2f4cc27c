"""The same tiny recipe trains from an ImageFolder and from its packed shards: the same
images, classes and (read by index) metrics; under torchrun every training image is used
once per epoch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import HOSTILE, ROOT, TINY, cli, read_metrics, set_args, torchrun_deitctl
from test_shards import make_tree

from deitctl_plugins.datasets import _rgb_loader

RECORDER = '''
"""Records each training image (md5 of its pixels) and its sample seed, one file per process."""
import hashlib, os, torch, deitctl
from deitctl_plugins.augmentations import simple

class Recorded:
    def __init__(self, inner):
        self.inner = inner
    def __call__(self, img):
        with open(os.path.join(os.environ["RECORD_DIR"], f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{hashlib.md5(img.tobytes()).hexdigest()} {torch.initial_seed()}\\n")
        return self.inner(img)

def recording(*, img_size, mean, std, num_classes, **options):
    aug = simple(img_size=img_size, mean=mean, std=std, num_classes=num_classes, **options)
    aug.train_transform = Recorded(aug.train_transform)
    return aug

@deitctl.hookimpl
def register_augmentations(register):
    register("recording", recording, help="simple, recording each training image")
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shards_train")
    tree = make_tree(base / "tree")
    code, output = cli("data", "pack", str(tree), str(base / "packed"), "--shard-size", "0.03")
    assert code == 0, output
    return tree, base / "packed"


def _sets(dataset: str, root: Path, out: Path, *extra: str) -> list[str]:
    return set_args(
        [
            f"data.dataset={dataset}",
            f"data.root={json.dumps(str(root))}",
            f"run.output_dir={json.dumps(str(out))}",
            "data.train_per_class=0",
            "data.val_per_class=0",
            "run.epochs=2",
            *extra,
        ]
    )


@pytest.mark.slow  # three short runs
def test_the_same_recipe_trains_from_the_folder_and_its_shards(data, tmp_path):
    tree, packed = data
    runs = {}
    for name, dataset, root, extra in (
        ("folder", "imagefolder", tree, ()),
        ("shards", "webdataset", packed, ()),
        ("stream", "webdataset", packed, ("data.stream=true", "data.num_workers=2")),
    ):
        code, output = cli("train", str(HOSTILE / "tiny.toml"), *_sets(dataset, root, tmp_path / name, *extra))
        assert code == 0, output
        assert "3 classes, 24 training images" in output
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        runs[name] = (ckpt["classes"], read_metrics(tmp_path / name))
    classes, folder = runs["folder"]
    for name in ("shards", "stream"):
        assert runs[name][0] == classes == ["airplane", "cat", "dog"]
        assert [m["train_images"] for m in runs[name][1]] == [m["train_images"] for m in folder] == [24, 24]
    keys = ("train_loss", "acc1", "acc5", "loss")
    assert [[m[k] for k in keys] for m in runs["shards"][1]] == [[m[k] for k in keys] for m in folder]  # exact


def test_eval_of_a_checkpoint_on_the_shards(data, tmp_path):
    tree, packed = data
    code, output = cli("train", str(HOSTILE / "tiny.toml"), *_sets("imagefolder", tree, tmp_path / "run"))
    assert code == 0, output
    code, folder = cli("eval", "--ckpt", str(tmp_path / "run" / "last.pt"), "--json")
    assert code == 0, folder
    code, shards = cli(
        "eval",
        "--ckpt",
        str(tmp_path / "run" / "last.pt"),
        "--data",
        str(packed),
        "--set",
        "data.dataset=webdataset",
        "--json",
    )
    assert code == 0, shards
    a, b = json.loads(folder.splitlines()[-1]), json.loads(shards.splitlines()[-1])
    assert a["images"] == b["images"] == 12 and a["acc1"] == b["acc1"] and a["loss"] == b["loss"]


@pytest.mark.slow  # torchrun, 2 processes; the shards read by index share out like an ImageFolder (test_shards.py)
def test_under_torchrun_every_streamed_training_image_is_used_once_per_epoch(data, tmp_path):
    tree, packed = data
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "deitctl_recording.py").write_text(RECORDER)
    record = tmp_path / "record"
    record.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(tmp_path / "plugin"),
        "DEITCTL_PLUGINS": "deitctl_recording",
        "RECORD_DIR": str(record),
    }
    extra = ["augmentation.plugin=recording", "data.batch_size=4", "data.num_workers=1", "data.stream=true"]
    cmd = [
        *torchrun_deitctl(),
        "train",
        str(HOSTILE / "tiny.toml"),
        *_sets("webdataset", packed, tmp_path / "run", *extra),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    lines = [line.split() for f in record.iterdir() for line in f.read_text().splitlines()]
    images = Counter(hashlib.md5(_rgb_loader(str(p)).tobytes()).hexdigest() for p in tree.glob("train/*/*.jpg"))
    assert len(images) == 24 and set(images.values()) == {1}
    for epoch in (0, 1):  # seed 0: a sample's seed is epoch * 100003 + its position in the epoch
        drawn = [(md5, int(seed) % 100_003) for md5, seed in lines if int(seed) // 100_003 == epoch]
        assert Counter(md5 for md5, _ in drawn) == images  # every training image once
        assert sorted(p for _, p in drawn) == list(range(24))


def test_a_teacher_cache_refuses_streamed_shards_naming_the_key(data, tmp_path):
    """The cache replays the sampler's exact order, which a stream does not have: teaching a
    stream is refused, and so is training a stream from a cache taught on the same shards
    read by index."""
    _, packed = data
    teacher = [
        "distillation.strategy=hard",
        "teacher.plugin=timm",
        "teacher.model=resnet18",
        "teacher.channels=[8, 16, 32, 64]",
    ]
    cache = tmp_path / "cache"
    code, output = cli(
        "teach",
        str(TINY),
        "--cache",
        str(cache),
        *_sets("webdataset", packed, tmp_path / "a", *teacher, "data.stream=true"),
    )
    assert code == 2, output
    assert "streamed shards" in output and "[data.root]" in output and not cache.exists(), output
    code, output = cli(
        "teach", str(TINY), "--cache", str(cache), *_sets("webdataset", packed, tmp_path / "a", *teacher)
    )
    assert code == 0, output
    with_cache = [*teacher, f"teacher.cache={json.dumps(str(cache))}", "data.stream=true"]
    code, output = cli("train", str(TINY), *_sets("webdataset", packed, tmp_path / "b", *with_cache))
    assert code == 2, output
    assert "streamed shards" in output and "[teacher.cache]" in output and "Traceback" not in output, output
