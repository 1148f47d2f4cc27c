"""Write ``cifar-10-python.tar.gz`` in the official layout from CIFAR-10 images on disk.

For machines that cannot download the official archive (this project's test machines): the
images of an ImageFolder copy of CIFAR-10 (``train/<class>/*``, ``test/<class>/*`` or ``val/<class>/*``, 32×32),
or of a ``.tar.gz`` holding one, go into ``cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}`` as the official archive has them: pickles (protocol 2) of dicts with byte-string
keys, ``data`` a uint8 array of N × 3072 (the red plane, then green, then blue), ``labels`` a
list of ints. ``deitctl data cifar10 DEST --from ARCHIVE`` then imports it as it imports the
real one::

    python benchmarks/cifar10_archive.py ../shared/data/cifar10-jpeg.tar.gz /tmp/cifar-10-python.tar.gz
    deitctl data cifar10 data/cifar10 --from /tmp/cifar-10-python.tar.gz

The training images are shuffled (seed 0) across the five batches, as in the real archive.
"""

from __future__ import annotations

import argparse
import io
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _folder(source: Path, tmp: Path) -> Path:
    """The folder holding ``train/`` and ``test/`` (a ``.tar.gz`` is unpacked into ``tmp``)."""
    if source.is_file():
        with tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
        source = tmp
    for candidate in (source, *sorted(p for p in source.iterdir() if p.is_dir())):
        if (candidate / "train").is_dir() and any((candidate / s).is_dir() for s in ("test", "val")):
            return candidate
    raise SystemExit(f"{source}: no train/ and test/ (or val/) folders")


def _split(root: Path, rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
    files = [(path, label) for label, name in enumerate(CLASSES) for path in sorted((root / name).iterdir())]
    if rng is not None:
        files = [files[i] for i in rng.permutation(len(files))]
    data = np.empty((len(files), 3072), dtype=np.uint8)
    for row, (path, _) in enumerate(files):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if pixels.shape != (32, 32, 3):
            raise SystemExit(f"{path}: {pixels.shape[1]}x{pixels.shape[0]}, not 32x32")
        data[row] = pixels.transpose(2, 0, 1).reshape(-1)
    return data, [label for _, label in files]


def _add(tar: tarfile.TarFile, name: str, obj: object) -> None:
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_archive(source: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = _folder(source, Path(tmp))
        train, train_labels = _split(root / "train", np.random.default_rng(0))
        test, test_labels = _split(root / "test" if (root / "test").is_dir() else root / "val", None)
    batches = np.array_split(np.arange(len(train)), 5)
    with tarfile.open(out, "w:gz") as tar:
        for i, rows in enumerate(batches, start=1):
            _add(
                tar,
                f"data_batch_{i}",
                {
                    b"batch_label": f"training batch {i} of 5".encode(),
                    b"labels": [train_labels[r] for r in rows],
                    b"data": train[rows],
                    b"filenames": [f"train_{r:05d}.png".encode() for r in rows],
                },
            )
        _add(
            tar,
            "test_batch",
            {
                b"batch_label": b"testing batch 1 of 1",
                b"labels": test_labels,
                b"data": test,
                b"filenames": [f"test_{r:05d}.png".encode() for r in range(len(test))],
            },
        )
        _add(
            tar,
            "batches.meta",
            {
                b"label_names": [c.encode() for c in CLASSES],
                b"num_cases_per_batch": len(batches[0]),
                b"num_vis": 3072,
            },
        )
    print(f"{out}: {len(train)} training and {len(test)} test images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an ImageFolder copy of CIFAR-10, or a .tar.gz of one")
    parser.add_argument("out", type=Path, help="the archive to write (cifar-10-python.tar.gz)")
    args = parser.parse_args()
    write_archive(args.source, args.out)


if __name__ == "__main__":
    main()
