"""``deitctl data cifar10``: archives in the real format (Python-2 pickles), hostile ones,
and the download, through a local file and a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image

import deitctl.cifar10 as cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 12


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what Python 2's cPickle wrote for the archive: str and bytes as 8-bit
    strings (BINSTRING), arrays through numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def numpy2_dumps(obj) -> bytes:
    """What NumPy 2 on Python 3 writes: numpy._core names, bytes through _codecs.encode."""
    return pickle.dumps(obj, protocol=2)


def _batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH):
        labels = [int(x) for x in rng.integers(0, 10, PER_BATCH)]
        out[name] = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)],
        }
    out[cifar10.META] = {
        b"label_names": [c.encode() for c in CLASSES],
        b"num_cases_per_batch": PER_BATCH,
        b"num_vis": 3072,
    }
    return out


def make_archive(path: Path, dumps=py2_dumps, replace: dict[str, bytes] | None = None) -> dict[str, dict]:
    """A cifar-10-python.tar.gz with the official member names; returns the batches."""
    batches = _batches()
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            data = (replace or {}).get(name) or dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


def _assert_images(dest: Path, batches: dict[str, dict]) -> None:
    train = [batches[b] for b in cifar10.TRAIN_BATCHES]
    for split, parts in (("train", train), ("test", [batches[cifar10.TEST_BATCH]])):
        data = np.concatenate([p[b"data"] for p in parts])
        labels = [label for p in parts for label in p[b"labels"]]
        files = sorted((dest / split).glob("*/*.png"))
        assert len(files) == len(labels)
        assert sorted(p.name for p in (dest / split).iterdir()) == sorted(CLASSES)
        for i, label in enumerate(labels):
            img = Image.open(dest / split / CLASSES[label] / f"{i:05d}.png")
            assert img.mode == "RGB" and img.size == (32, 32)
            expected = data[i].reshape(3, 32, 32).transpose(1, 2, 0)  # rows of R, then G, then B
            assert np.array_equal(np.asarray(img), expected)  # lossless


def test_the_archive_written_by_python2_is_read_exactly(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = make_archive(archive, py2_dumps)
    assert b"numpy.core.multiarray\n_reconstruct" in py2_dumps(batches["data_batch_1"])
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(archive))
    assert code == 0, output
    assert "60" in output and "training images" in output
    _assert_images(tmp_path / "c10", batches)
    assert archive.is_file()  # a file given with --from is the user's: kept
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(archive))
    assert code == 0 and "already" in output  # a finished import: nothing to do


def test_the_same_batches_pickled_by_numpy_2_are_read(tmp_path):
    archive = tmp_path / "c.tar.gz"
    batches = make_archive(archive, numpy2_dumps)
    raw = numpy2_dumps(batches["data_batch_1"])
    assert b"numpy._core.multiarray" in raw and b"_codecs" in raw
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(archive))
    assert code == 0, output
    _assert_images(tmp_path / "c10", batches)


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("dumps", [py2_dumps, numpy2_dumps])
def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path, dumps):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsACommand(marker), b"labels": []}, protocol=2)
    assert b"system" in evil
    archive = tmp_path / "evil.tar.gz"
    make_archive(archive, dumps, replace={"data_batch_3": evil})
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(archive))
    assert code == 2
    assert "data_batch_3" in output and "system" in output and "refused" in output
    assert not marker.exists()
    assert not (tmp_path / "c10" / "train").exists() and not (tmp_path / "c10" / "test").exists()
    pickle.loads(evil)  # the same pickle unrestricted would have run it
    assert marker.exists()


def test_arrays_of_python_objects_and_other_globals_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="Python objects"):
        cifar10.load_plain(pickle.dumps(np.array([1, 2], dtype=object), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.OrderedDict"):
        cifar10.load_plain(pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=2))
    assert cifar10.load_plain(py2_dumps({b"k": [1, b"x"]})) == {b"k": [1, b"x"]}


def test_an_archive_that_is_not_cifar10_names_what_is_missing(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(archive))
    assert code == 2 and "test_batch" in output and str(archive) in output
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    code, output = cli("data", "cifar10", str(tmp_path / "c10"), "--from", str(tmp_path / "junk.tar.gz"))
    assert code == 2 and "junk.tar.gz" in output


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_the_md5_and_leaves_nothing_when_it_differs(tmp_path, monkeypatch):
    served = tmp_path / "served" / "cifar-10-python.tar.gz"
    served.parent.mkdir()
    make_archive(served)
    monkeypatch.setattr(cifar10, "URL", served.as_uri())
    monkeypatch.setattr(cifar10, "MD5", "0" * 32)
    dest = tmp_path / "c10"
    code, output = cli("data", "cifar10", str(dest))
    assert code == 2 and "MD5" in output and _md5(served) in output
    assert sorted(p.name for p in dest.iterdir()) == []  # no archive, no partial file, no images


def test_download_over_http_then_import(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    batches = make_archive(served / "cifar-10-python.tar.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(cifar10, "URL", f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz")
        monkeypatch.setattr(cifar10, "MD5", _md5(served / "cifar-10-python.tar.gz"))
        code, output = cli("data", "cifar10", str(tmp_path / "c10"))
    finally:
        server.shutdown()
    assert code == 0, output
    _assert_images(tmp_path / "c10", batches)
    assert not (tmp_path / "c10" / "cifar-10-python.tar.gz").exists()  # downloaded: removed after the import
