"""``deitctl data pack`` and the ``webdataset`` dataset: local shards read by index give the
ImageFolder's samples exactly; streamed shards give every image once per epoch, over any
process and worker count, with seeded augmentation and mid-epoch resume; bad shards are
named."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import HOSTILE, SAMPLE, cli, set_args

from deitctl.data import make_loader, release_workers
from deitctl.shards import open_split
from deitctl.streaming import ShardStream
from deitctl_plugins.datasets import imagefolder

CLASSES = ("airplane", "cat", "dog")


def make_tree(root: Path, train: int = 8, val: int = 4) -> Path:
    for split, n in (("train", train), ("val", val)):
        for cls in CLASSES:
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    code, output = cli("data", "pack", str(tree), str(out), "--shard-size", "0.03")
    assert code == 0, output
    return out


def digest(img) -> torch.Tensor:
    """An image's identity, as a tensor the loader can batch."""
    return torch.tensor(int.from_bytes(hashlib.md5(img.tobytes()).digest()[:7], "little"))


def digest_and_draw(img) -> torch.Tensor:
    """The identity and a random draw from the sample's seeded RNG."""
    return torch.stack([digest(img), torch.randint(1 << 30, ())])


def reference(tree: Path, split: str) -> dict[int, int]:
    ds = imagefolder(root=str(tree), split=split)
    return {int(digest(ds[i][0])): ds.targets[i] for i in range(len(ds))}


def epoch(root, split, *, train, world=1, rank=0, workers=0, batch=4, epoch=0, skip=0, repeats=1, transform=digest):
    ds = open_split(str(root), split, transform, stream=True)
    loader = make_loader(
        ds, batch_size=batch, train=train, seed=3, num_workers=workers, num_replicas=world, rank=rank, repeats=repeats
    )
    loader.set_epoch(epoch, skip=skip)
    batches = [(x.tolist(), y.tolist()) for x, y in loader]
    assert len(batches) == len(loader)
    release_workers(loader)
    return batches


def _images(batches) -> list[int]:
    return [x if isinstance(x, int) else x[0] for xs, _ in batches for x in xs]


# --------------------------------------------------------------------------- pack, and reading by index


def test_pack_writes_webdataset_shards_and_a_manifest(tree, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES)
    assert manifest["splits"]["train"]["counts"] == dict.fromkeys(CLASSES, 8)
    assert manifest["splits"]["val"]["images"] == 12
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(len(s["keys"]) for s in shards) == 24
    with tarfile.open(packed / shards[0]["file"]) as tar:
        names = tar.getnames()
        first = shards[0]["keys"][0]
        assert names[:2] == [f"{first}.jpg", f"{first}.cls"]  # WebDataset layout: <key>.<ext>
        assert tar.extractfile(f"{first}.cls").read() == str(shards[0]["targets"][0]).encode()
    ds = imagefolder(root=str(tree), split="train")
    key = int(first)
    assert (packed / shards[0]["file"]).read_bytes()[
        shards[0]["offsets"][0] : shards[0]["offsets"][0] + shards[0]["sizes"][0]
    ] == Path(ds.samples[key][0]).read_bytes()  # stored byte for byte


def test_local_shards_read_by_index_are_the_image_folder(tree, packed):
    for split in ("train", "val"):
        a, b = imagefolder(root=str(tree), split=split), open_split(str(packed), split, None)
        assert a.classes == b.classes and a.targets == b.targets and len(a) == len(b)
        for i in range(len(a)):
            (x, y), (u, v) = a[i], b[i]
            assert y == v and x.mode == u.mode and x.tobytes() == u.tobytes()
    assert b.samples[0][0].endswith(".tar:00000000.jpg")


def test_shards_read_by_index_are_shared_out_as_the_folder_is(tree, packed):
    seen = []
    for rank in range(2):
        ds = open_split(str(packed), "train", digest)
        loader = make_loader(ds, batch_size=4, train=True, seed=0, num_workers=0, num_replicas=2, rank=rank)
        loader.set_epoch(1)
        seen += [x for xs, _ in loader for x in xs.tolist()]
    assert sorted(seen) == sorted(reference(tree, "train"))  # every image once per epoch


def test_max_side_reduces_large_training_images_only(tmp_path):
    from PIL import Image

    tree = make_tree(tmp_path / "tree", train=2, val=2)
    big = tree / "train" / "cat" / "big.png"
    Image.new("RGB", (200, 100), (10, 200, 30)).save(big)
    Image.new("RGB", (200, 100), (10, 200, 30)).save(tree / "val" / "cat" / "big.png")
    code, output = cli("data", "pack", str(tree), str(tmp_path / "out"), "--max-side", "64")
    assert code == 0, output
    train, val = open_split(str(tmp_path / "out"), "train", None), open_split(str(tmp_path / "out"), "val", None)
    sizes = {train.samples[i][0].rsplit(":")[-1]: train[i][0].size for i in range(len(train))}
    assert sorted(sizes.values())[-1] == (64, 32)  # the large one, longer side 64
    assert [s for s in sizes.values() if s != (64, 32)] == [(32, 32)] * 6  # the others untouched
    assert max(val[i][0].size for i in range(len(val))) == (200, 100)  # evaluation data exact
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["max_side"] == 64 and manifest["splits"]["val"]["max_side"] is None
    code, output = cli("data", "pack", str(tree), str(tmp_path / "out"))
    assert code == 2 and "--overwrite" in output


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_a_streamed_epoch_gives_every_training_image_once(tree, packed, world, workers):
    ref = reference(tree, "train")
    seen = []
    for rank in range(world):
        batches = epoch(packed, "train", train=True, world=world, rank=rank, workers=workers)
        assert all(len(xs) == 4 for xs, _ in batches)
        for xs, ys in batches:
            assert [ref[x] for x in xs] == ys  # each image with its class
        seen += _images(batches)
    if 24 % (4 * world) == 0:
        assert sorted(seen) == sorted(ref)  # every image once
    else:  # equal whole batches per process: DistributedSampler's padding, drop_last
        assert len(seen) == 24 // world // 4 * 4 * world and len(set(seen)) == len(seen)


def test_streamed_evaluation_counts_every_image_exactly_once(tree, packed):
    ref = reference(tree, "val")
    for world, workers, batch in ((1, 0, 5), (2, 2, 5), (3, 2, 4)):
        seen = [
            x
            for r in range(world)
            for x in _images(epoch(packed, "val", train=False, world=world, rank=r, workers=workers, batch=batch))
        ]
        assert sorted(seen) == sorted(ref)


def test_epochs_are_reshuffled_and_repeatable(packed):
    a, b = epoch(packed, "train", train=True, epoch=1), epoch(packed, "train", train=True, epoch=1)
    c = epoch(packed, "train", train=True, epoch=2)
    assert a == b and _images(a) != _images(c) and sorted(_images(a)) == sorted(_images(c))
    ds = open_split(str(packed), "train", digest, stream=True)  # persistent workers see each new epoch
    loader = make_loader(ds, batch_size=4, train=True, seed=3, num_workers=2)
    for e in (1, 2):
        loader.set_epoch(e)
        assert [(x.tolist(), y.tolist()) for x, y in loader] == epoch(packed, "train", train=True, epoch=e, workers=2)
    release_workers(loader)


def test_repeated_augmentation_shows_each_image_k_times_every_k_epochs(tree, packed):
    counts: Counter[int] = Counter()
    for e in range(3):
        images = _images(epoch(packed, "train", train=True, epoch=e, repeats=3, transform=digest_and_draw))
        assert len(images) == 24  # an epoch keeps the length of one pass
        counts.update(images)
    assert set(counts.values()) == {3} and set(counts) == set(reference(tree, "train"))


def test_augmentation_is_seeded_per_sample_and_resume_mid_epoch_is_exact(packed):
    full = epoch(packed, "train", train=True, workers=2, epoch=1, transform=digest_and_draw)
    again = epoch(packed, "train", train=True, workers=0, epoch=1, transform=digest_and_draw)
    draws = {x[0]: x[1] for xs, _ in full for x in xs}
    assert {x[0]: x[1] for xs, _ in again for x in xs} == draws  # same draws for any worker count
    for skip in (1, 3):
        rest = epoch(packed, "train", train=True, workers=2, epoch=1, skip=skip * 4, transform=digest_and_draw)
        assert rest == full[skip:]


def test_train_per_class_selects_from_the_stream(packed):
    from deitctl.data import per_class_subset

    ds = open_split(str(packed), "train", digest, stream=True)
    sub = per_class_subset(ds, 2)
    assert isinstance(sub, ShardStream) and len(sub) == 6
    loader = make_loader(sub, batch_size=2, train=False, seed=0, num_workers=0)
    targets = [t for _, ys in loader for t in ys.tolist()]
    assert sorted(targets) == [0, 0, 1, 1, 2, 2]


def test_streaming_from_a_url(tree, packed):
    import functools
    import http.server
    import threading

    pytest.importorskip("webdataset")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(packed))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ds = open_split(url, "val", digest)
        assert isinstance(ds, ShardStream) and ds.classes == list(CLASSES)
        loader = make_loader(ds, batch_size=5, train=False, seed=0, num_workers=0)
        assert sorted(x for xs, _ in loader for x in xs.tolist()) == sorted(reference(tree, "val"))
        seen = []  # three processes: they stop reading shards in the middle
        for rank in range(3):
            ds = open_split(url, "train", digest)
            loader = make_loader(ds, batch_size=4, train=True, seed=0, num_workers=0, num_replicas=3, rank=rank)
            loader.set_epoch(1)
            seen += [x for xs, _ in loader for x in xs.tolist()]
        assert sorted(seen) == sorted(reference(tree, "train"))
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(packed, out)
    return out


def _train(root: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    sets = [
        "data.dataset=webdataset",
        f"data.root={json.dumps(str(root))}",
        f"run.output_dir={json.dumps(str(tmp_path / 'run'))}",
        "data.train_per_class=0",
        *extra,
    ]
    return cli("train", str(HOSTILE / "tiny.toml"), *set_args(sets))


def test_a_truncated_shard_is_named(copy, tmp_path):
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    code, output = _train(copy, tmp_path)
    assert code == 2 and str(shard) in output and "bytes" in output
    assert output.count("\n") <= 3 and "Traceback" not in output


def test_a_shard_the_manifest_does_not_describe_is_named(copy, tmp_path):
    a, b = copy / "train-000000.tar", copy / "train-000001.tar"
    data = b.read_bytes()
    a.write_bytes(data[: a.stat().st_size].ljust(a.stat().st_size, b"\0"))  # same size, other content
    code, output = _train(copy, tmp_path)
    assert code == 2 and str(a) in output and "manifest.json says" in output
    code, output = _train(copy, tmp_path, "data.stream=true")  # streamed: found when read
    assert code == 2 and str(a) in output and "does not match" in output and "Traceback" not in output


def test_an_unreadable_manifest_and_a_root_of_neither_layout_are_named(copy, tmp_path, tree):
    (copy / "manifest.json").write_text("{not json")
    code, output = _train(copy, tmp_path)
    assert code == 2 and str(copy / "manifest.json") in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = _train(empty, tmp_path)
    assert code == 2 and str(empty) in output and "data.root" in output and "manifest.json" in output
    code, output = _train(tree, tmp_path)  # an ImageFolder given to the webdataset dataset
    assert code == 2 and 'data.dataset = "imagefolder"' in output
    code, output = cli(
        "train",
        str(HOSTILE / "tiny.toml"),
        *set_args([f"data.root={json.dumps(str(copy))}", f"run.output_dir={json.dumps(str(tmp_path / 'r2'))}"]),
    )
    assert code == 2 and 'use data.dataset = "webdataset"' in output


def test_data_check_decodes_packed_shards_and_names_a_broken_one(copy):
    code, output = cli("data", "check", str(copy), "--workers", "2")
    assert code == 0 and "36 images" in output and "0 errors" in output, output
    shard = copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-4096])
    code, output = cli("data", "check", str(copy), "--json")
    problems = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert code == 2 and [(p["kind"], p["path"]) for p in problems] == [("shard", str(shard))]


def test_streaming_through_a_pipe_command(tree, packed):
    pytest.importorskip("webdataset")
    ds = open_split(f"pipe:cat {packed}/{{}}", "val", digest)
    assert isinstance(ds, ShardStream)
    loader = make_loader(ds, batch_size=5, train=False, seed=0, num_workers=0)
    assert sorted(x for xs, _ in loader for x in xs.tolist()) == sorted(reference(tree, "val"))


def test_urls_without_the_webdataset_package_name_the_extra(packed, monkeypatch):
    import sys

    from deitctl.errors import UserError

    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset raises ImportError
    with pytest.raises(UserError, match=r"deitctl\[webdataset\]"):
        open_split("http://127.0.0.1:9/shards", "train", None)
    assert len(open_split(str(packed), "train", None)) == 24  # local shards need no package


def test_recipe_validate_reads_the_classes_from_the_manifest(packed, tmp_path):
    code, output = cli(
        "recipe",
        "validate",
        str(HOSTILE / "tiny.toml"),
        *set_args(["data.dataset=webdataset", f"data.root={json.dumps(str(packed))}"]),
    )
    assert code == 0, output
    code, output = cli(
        "recipe",
        "validate",
        str(HOSTILE / "tiny.toml"),
        *set_args(["data.dataset=webdataset", f"data.root={json.dumps(str(packed))}", "data.num_classes=5"]),
    )
    assert code == 2 and "the dataset has 3 classes" in output
