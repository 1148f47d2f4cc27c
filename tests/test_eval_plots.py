"""Evaluation beyond top-1 (per-class top-1, confusion matrix, ReaL-format labels, several
sets in one command, loader workers within the cores) and ``compare --plot``, on tiny real
runs and real CIFAR-10 images."""

from __future__ import annotations

import json
import random
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HOSTILE, SAMPLE, cli, read_metrics

from deitctl.evaluation import student_heads
from deitctl.inference import load_student

TINY = HOSTILE / "tiny.toml"
PNG = b"\x89PNG\r\n\x1a\n"


def _train(out: Path, *sets: str) -> Path:
    args = ["train", str(TINY), "--output-dir", str(out), "--set", f"data.root={json.dumps(str(SAMPLE))}"]
    code, text = cli(*args, *[a for s in ("run.epochs=2", "data.val_per_class=3", *sets) for a in ("--set", s)])
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("runs")
    plain = _train(base / "plain")
    token = _train(
        base / "token",
        'student.model="deit_tiny_distilled_patch16_224"',
        'distillation.strategy="token"',
        'teacher.model="resnet18"',
        "teacher.channels=[8, 16, 32, 64]",
    )
    return plain, token


def _predict(ckpt: Path, files: list[Path]) -> list[int]:
    """The checkpoint's fused top-1 for image files, computed here (not through eval)."""
    from PIL import Image

    from deitctl.factories import build_augmentation

    recipe, student, classes, mean, std = load_student(ckpt)
    transform = build_augmentation(recipe, mean, std, len(classes)).eval_transform
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return student_heads(student.eval(), images)[0].argmax(1).tolist()


def _eval(*args: str) -> list[dict]:
    code, text = cli("eval", *args, "--json")
    assert code == 0, text
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_per_class_top1_and_the_confusion_matrix(runs, tmp_path):
    plain, _ = runs
    figure = tmp_path / "figs" / "confusion.png"
    (metrics,) = _eval("--ckpt", str(plain / "best.pt"), "--confusion", str(figure))
    classes = sorted(p.name for p in (SAMPLE / "val").iterdir())
    files = [f for c in classes for f in sorted((SAMPLE / "val" / c).iterdir())[:3]]  # val_per_class = 3
    predicted = _predict(plain / "best.pt", files)
    expected = {c: sum(p == i for p in predicted[i * 3 : i * 3 + 3]) / 3 * 100 for i, c in enumerate(classes)}
    assert metrics["per_class_acc1"] == pytest.approx(expected)
    assert sum(expected.values()) / 10 == pytest.approx(metrics["acc1"], abs=1e-4)
    assert metrics["confusion"] == str(figure) and figure.read_bytes()[:8] == PNG


def _imagenet_like_val(root: Path, count: int = 40) -> tuple[list[Path], list[int]]:
    """``root/val/<class>/val_NNNNNNNN.JPEG``: real CIFAR-10 images numbered as the ImageNet
    validation files are, the numbers shuffled across the class folders. Returns the files
    in number order and their classes."""
    classes = sorted(p.name for p in (SAMPLE / "val").iterdir())
    numbers = list(range(1, count + 1))
    random.Random(0).shuffle(numbers)
    by_number: dict[int, tuple[Path, int]] = {}
    for k, number in enumerate(numbers):
        target = k % len(classes)
        source = sorted((SAMPLE / "val" / classes[target]).iterdir())[10 + k]
        dest = root / "val" / classes[target] / f"val_{number:08d}.JPEG"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dest)
        by_number[number] = (dest, target)
    return [by_number[n][0] for n in sorted(by_number)], [by_number[n][1] for n in sorted(by_number)]


def test_real_labels_follow_the_file_numbers_through_a_subset(tmp_path):
    from torchvision.datasets import ImageFolder

    from deitctl.data import per_class_subset
    from deitctl.inference import real_labels

    files, _ = _imagenet_like_val(tmp_path / "set")
    # each entry identifies its file: [n % 10, n // 10] for file number n + 1
    (tmp_path / "real.json").write_text(json.dumps([[n % 10, n // 10] for n in range(len(files))]))
    dataset = per_class_subset(ImageFolder(str(tmp_path / "set" / "val")), 3)
    labels = real_labels(tmp_path / "real.json", dataset, 10)
    assert len(labels) == len(dataset) == 30
    for k, index in enumerate(dataset.indices):
        n = int(Path(dataset.dataset.samples[index][0]).stem.split("_")[1]) - 1
        assert labels[k] == [n % 10, n // 10]


def test_real_top1_and_top5_count_any_acceptable_class_and_skip_empty_lists():
    from deitctl.evaluation import RealLabels

    logits = -0.01 * torch.arange(10.0).repeat(4, 1)  # no ties: then 0, 1, 2, ...
    for row, ranking in enumerate([[3, 1], [5, 2], [0, 9], [4, 6]]):
        logits[row, ranking] = torch.tensor([2.0, 1.0])  # top-1 first, then second
    real = RealLabels([[3, 7], [2], [], [8]])
    real(logits[:2], torch.zeros(2, dtype=torch.long))
    real(logits[2:], torch.zeros(2, dtype=torch.long))
    # top-1 right: image 0 only; top-5 right: images 0 and 1 (2 is in [5, 2, 0, 1, 3]), not 3
    assert real.result() == {"real_acc1": pytest.approx(100 / 3), "real_acc5": pytest.approx(200 / 3), "real_images": 3}


def test_eval_reports_real_top1_beside_top1(runs, tmp_path):
    plain, _ = runs
    files, targets = _imagenet_like_val(tmp_path / "set")
    predicted = _predict(plain / "best.pt", files)
    # in file-number order: the true class and, for some images, the predicted class too;
    # every fifth image has no label and is left out
    labels = [
        [] if i % 5 == 4 else sorted({t, p} if i % 2 else {t}) for i, (t, p) in enumerate(zip(targets, predicted))
    ]
    (tmp_path / "real.json").write_text(json.dumps(labels))
    args = ["--data", str(tmp_path / "set"), "--labels", str(tmp_path / "real.json"), "--set", "data.val_per_class=0"]
    (metrics,) = _eval("--ckpt", str(plain / "best.pt"), *args)
    kept = [(p, want) for p, want in zip(predicted, labels) if want]
    assert metrics["real_images"] == len(kept) == 32 and metrics["images"] == 40
    assert metrics["real_acc1"] == pytest.approx(sum(p in want for p, want in kept) / len(kept) * 100)
    assert metrics["acc1"] == pytest.approx(sum(p == t for p, t in zip(predicted, targets)) / 40 * 100)
    assert metrics["labels"] == str(tmp_path / "real.json")


def test_several_sets_in_one_command(runs, tmp_path):
    _, token = runs
    _imagenet_like_val(tmp_path / "set", count=20)
    first, second = _eval("--ckpt", str(token / "best.pt"), "--data", str(SAMPLE), "--data", str(tmp_path / "set"))
    assert first["data"] == str(SAMPLE) and first["images"] == 30
    assert second["data"] == str(tmp_path / "set") and second["images"] == 20
    assert {"acc1_cls", "acc1_dist"} <= first.keys() & second.keys()
    (alone,) = _eval("--ckpt", str(token / "best.pt"), "--data", str(tmp_path / "set"))
    assert alone["acc1"] == second["acc1"]


def test_bad_labels_files_name_the_file(runs, tmp_path):
    plain, _ = runs
    _imagenet_like_val(tmp_path / "set", count=10)
    cases = {
        "short.json": (json.dumps([[0]] * 3), "3 entries, but the split has 10 images"),
        "text.json": ("not json", "readable JSON"),
        "range.json": (json.dumps([[12]] * 10), "class index 12 is out of range"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        args = ["--ckpt", str(plain / "best.pt"), "--data", str(tmp_path / "set"), "--labels", str(tmp_path / name)]
        code, text = cli("eval", *args)
        assert code == 2 and str(tmp_path / name) in text and message in " ".join(text.split()), text
    code, text = cli(
        "eval", "--ckpt", str(plain / "best.pt"), "--data", str(SAMPLE), "--data", str(SAMPLE), "--labels", "x.json"
    )
    assert code == 2 and "--labels: give one per --data" in text


def test_eval_creates_no_more_loader_workers_than_cores(runs, monkeypatch):
    """torch warns when a DataLoader has more workers than usable cores; eval stays within them."""
    plain, _ = runs
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})  # one usable core, for torch and deitctl
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = _eval("--ckpt", str(plain / "best.pt"), "--set", "data.num_workers=4")
    assert metrics[0]["images"] == 30
    assert not [w for w in caught if "worker processes" in str(w.message)]

    from deitctl.runtime import loader_workers

    assert loader_workers(4) == 1 and loader_workers(0) == 0


def test_compare_plot_draws_each_run_by_name_and_strategy(runs, tmp_path):
    plain, token = runs
    figure = tmp_path / "compare.png"
    code, text = cli("compare", str(plain), str(token), "--plot", str(figure))
    assert code == 0, text
    assert figure.read_bytes()[:8] == PNG and f"wrote {figure}" in text

    from deitctl.compare import run_history
    from deitctl.plots import plot_runs

    drawn = plot_runs([run_history(plain), run_history(token)], tmp_path / "again.png")
    top1, loss = drawn.axes[:2]
    assert [line.get_label() for line in top1.lines] == ["plain (none)", "token (token)"]
    for line, run in zip(top1.lines, (plain, token)):
        assert list(line.get_ydata()) == [m["acc1"] for m in read_metrics(run)]
    for line, run in zip(loss.lines, (plain, token)):
        assert list(line.get_ydata()) == [m["train_loss"] for m in read_metrics(run)]


def test_plots_without_matplotlib_name_the_extra(runs, tmp_path, monkeypatch):
    plain, _ = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, text = cli("compare", str(plain), "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "pip install 'deitctl[plot]'" in text
    code, text = cli("eval", "--ckpt", str(plain / "best.pt"), "--confusion", str(tmp_path / "x.png"))
    assert code == 2 and "--confusion needs matplotlib" in text
    assert not (tmp_path / "x.png").exists()
