"""``deitctl data check``: every problem found, listed with its path; exit 0 only when clean."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, cli
from PIL import Image


def _copy(dst: Path, cls: str, n: int, split: str = "train") -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted((SAMPLE / split / cls).iterdir())[:n]
    for f in files:
        shutil.copy(f, dst / f.name)
    return [dst / f.name for f in files]


@pytest.fixture
def clean(tmp_path) -> Path:
    root = tmp_path / "clean"
    for cls in ("airplane", "cat"):
        _copy(root / "train" / cls, cls, 20)
        _copy(root / "val" / cls, cls, 4, split="val")
    return root


def test_a_clean_tree_passes_decoding_on_two_processes(clean):
    code, output = cli("data", "check", str(clean), "--workers", "2")
    assert code == 0, output
    assert "48 images" in output and "0 errors, 0 warnings" in output


@pytest.fixture
def broken(clean) -> Path:
    root = clean
    cat = root / "train" / "cat"
    rgb = np.asarray(Image.open(next(cat.iterdir())).convert("RGB"))
    (cat / "broken.jpg").write_bytes(b"this is not an image")
    big = io.BytesIO()
    Image.fromarray(np.kron(rgb, np.ones((8, 8, 1), dtype=np.uint8))).save(big, "JPEG", quality=95)
    (cat / "truncated.jpg").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    Image.fromarray(rgb[..., 0]).save(cat / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(cat / "cmyk.jpg")
    Image.fromarray(rgb[:4, :4]).save(cat / "tiny.png")
    (root / "train" / "dog").mkdir()  # empty class folder, and a class val lacks
    _copy(root / "val" / "bird", "bird", 2, split="val")  # a class training lacks
    return root


def test_every_problem_is_listed_with_its_path_and_the_exit_code_is_2(broken):
    code, output = cli("data", "check", str(broken), "--json", "--workers", "2")
    assert code == 2
    problems = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    found = {(p["kind"], Path(p["path"]).name, p["severity"]) for p in problems}
    assert found == {
        ("unreadable", "broken.jpg", "error"),
        ("unreadable", "truncated.jpg", "error"),
        ("empty_class", "dog", "error"),
        ("class_missing", "bird", "error"),  # in val, not in train
        ("class_missing", "dog", "error"),  # in train, not in val
        ("mode", "gray.png", "warning"),
        ("mode", "cmyk.jpg", "warning"),
        ("tiny", "tiny.png", "warning"),
    }
    for p in problems:
        if p["kind"] in ("unreadable", "mode", "tiny"):
            assert Path(p["path"]).is_file() and p["split"] == "train"
    truncated = next(p for p in problems if p["path"].endswith("truncated.jpg"))
    assert "truncated" in truncated["detail"]
    assert "5 errors, 3 warnings" in output


def test_warnings_alone_pass_unless_strict(clean):
    cat = clean / "train" / "cat"
    Image.open(next(cat.iterdir())).convert("L").save(cat / "gray.png")
    code, output = cli("data", "check", str(clean))
    assert code == 0 and "warning mode" in output and "gray.png" in output
    code, _ = cli("data", "check", str(clean), "--strict")
    assert code == 2


def test_a_root_holding_neither_layout_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, output = cli("data", "check", str(tmp_path))
    assert code == 2 and str(tmp_path) in output and "neither" in output
    code, output = cli("data", "check", str(tmp_path / "missing"))
    assert code == 2 and "no such folder" in output
