"""Reliability and security: what a run does when the world is hostile.

Tiny real runs (a 1-2 block DeiT, embed_dim 32, patch 8, on 32 px CIFAR-10 images from
data/cifar10-sample, a few images a class) through the real command line: in a
subprocess (``python -m deitctl``) where signals are involved, in-process (typer's
CliRunner) elsewhere. Every test checks the exit code and the message.

1. SIGKILL at random (seeded) moments never leaves a broken ``last.pt``.
2. SIGTERM, then ``--resume``: bitwise the uninterrupted run (model, EMA, optimizer).
3. Checkpoints whose unpickling would run code are refused wherever they are read.
4. Unreadable, unusual and very large images; empty and unknown class folders.
5. A non-finite loss stops the run with exit code 1 and keeps the last good checkpoint.
6. Plugins that raise, return the wrong type, or produce logits of the wrong shape.
7. An output directory that cannot be made; a disk that fills up while saving.

Fixtures live in tests/hostile/: ``tiny.toml`` (the base recipe) and
``deitctl_hostile_plugins.py`` (loaded with ``DEITCTL_PLUGINS``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    PLUGIN_MODULE,
    SAMPLE,
    SMALL_ROOT_SETS,
    cli,
    epochs_in_metrics,
    file_id,
    finish,
    load_ckpt,
    metrics_lines,
    plugins_from_env,
    reaped,
    small_root,
    spawn,
    subprocess_env,
    train_args,
    wait_for,
)

CKPT_NAMES = {"last.pt", "best.pt", "metrics.jsonl", "recipe.toml", ".deitctl.lock"}
# what a killed process may leave behind: save_checkpoint's temporary files and the
# output-directory write probe; neither ends in ".pt", so neither passes for a checkpoint
LEFTOVER = re.compile(r"\.(last|best)\.pt\.\d+\.tmp|\.write-test-\d+")


class _Touch:
    """Unpickling this creates a file: a stand-in for any code a pickle can run."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


# --------------------------------------------------------------------------- 1. SIGKILL


def check_output_dir(out: Path) -> int | None:
    """What a killed run leaves: valid checkpoints, consistent metrics, and no stray
    file that looks like a checkpoint. Returns last.pt's epoch (0-based) or None.

    metrics.jsonl must hold each epoch at most once, in order; that no epoch goes missing
    is left to test_resume_after_a_crash_between_checkpoint_and_metrics_keeps_every_epoch,
    which makes that crash happen on purpose (here a kill falls there only by chance)."""
    for f in out.iterdir():
        assert f.name in CKPT_NAMES or LEFTOVER.fullmatch(f.name), f"unexpected file {f.name} in {out}"
    epochs = epochs_in_metrics(out)
    assert epochs == sorted(set(epochs)), f"metrics.jsonl epochs {epochs}"
    if not (out / "last.pt").exists():
        assert not (out / "best.pt").exists()
        return None
    last = load_ckpt(out / "last.pt")
    epoch = int(last["epoch"])
    if "resume_step" not in last:  # an end-of-epoch checkpoint carries that epoch's metrics
        assert last["metrics"]["epoch"] == epoch + 1
    # the metrics line is written next to last.pt; a kill may fall between the two
    assert abs((epochs[-1] if epochs else 0) - (epoch + 1)) <= 1, f"last.pt is epoch {epoch + 1}, metrics has {epochs}"
    if (out / "best.pt").exists():
        assert int(load_ckpt(out / "best.pt")["epoch"]) <= epoch
    return epoch


def _saving_last(out: Path) -> bool:
    try:
        return any(name.startswith(".last.pt.") and name.endswith(".tmp") for name in os.listdir(out))
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    """Real ``deitctl train`` processes SIGKILLed during start-up, in the middle of writing a
    checkpoint, and at a seeded random moment of training (a step, an evaluation or a save),
    each resumed by the next one; after every kill last.pt loads with weights_only=True and
    agrees with metrics.jsonl. Finally a resumed run (in-process) completes."""
    rng = random.Random(20240607)
    out = tmp_path / "run"
    sets = ["run.epochs=500", "data.train_per_class=2", "ema.enabled=true", "ema.decay=0.9"]
    for moment in ("start-up", "saving", "training"):
        before = file_id(out / "last.pt")
        with reaped(spawn(train_args(out, *sets, resume=before is not None))) as proc:
            if moment == "start-up":  # imports, model building, maybe the first epoch
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                wait_for(lambda before=before: file_id(out / "last.pt") != before, proc, "a checkpoint was saved")
                if moment == "saving":  # last.pt's temporary file is open: the kill lands in torch.save/fsync
                    wait_for(lambda: _saving_last(out), proc, "last.pt was being written", poll=0)
                else:
                    time.sleep(rng.uniform(0.0, 0.6))
            assert proc.poll() is None, finish(proc)[1]
            os.killpg(proc.pid, signal.SIGKILL)
            code, output = finish(proc)
        assert code == -signal.SIGKILL, output
        if out.exists():
            check_output_dir(out)
    epoch = check_output_dir(out)
    assert epoch is not None
    total = epoch + 3  # two more epochs to the end
    code, output = cli(*train_args(out, *sets, f"run.epochs={total}", resume=True))
    assert code == 0, output
    assert f"resuming from {out / 'last.pt'}" in output
    assert check_output_dir(out) == total - 1
    epochs = epochs_in_metrics(out)
    assert epochs[-1] == total and len(set(epochs)) == len(epochs)


# --------------------------------------------------------------------------- 2. SIGTERM and exact resume

EXACT_SETS = [
    "run.epochs=3",
    "student.depth=2",  # drop_path reaches block 2 only: the torch RNG is used
    "student.drop_path=0.1",
    "augmentation.plugin=slow_deit",  # the deit augmentation: mixup and cutmix use numpy's RNG
    "data.train_per_class=4",  # 40 images, 5 steps of 8 an epoch
    "data.batch_size=8",
    "ema.enabled=true",
    "ema.decay=0.9",
]


def _tensors_equal(a, b, where: str) -> list[str]:
    """Paths where two nested structures of tensors and plain data differ (bitwise)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in _tensors_equal(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensors_equal(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


@pytest.fixture
def hostile_plugins():
    with plugins_from_env():
        yield


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def sigterm_run(request, tmp_path_factory):
    """An uninterrupted 3-epoch run; a real ``python -m deitctl train`` process sent SIGTERM
    at a seeded random moment after its first epoch; then ``--resume`` to the end. (The
    uninterrupted and the resumed runs go in-process, to save start-up time: a run gives
    the same bits in-process and in a subprocess.)"""
    workers = request.param
    base = tmp_path_factory.mktemp(f"sigterm{workers}")
    sets = EXACT_SETS + [f"data.num_workers={workers}"]
    # the slow augmentation only sleeps (20 ms an image): epoch 2 lasts long enough for the
    # signal to land in it; its random transforms are the same as without the delay. The
    # process starts up while the reference runs, and trains once the hold file is gone.
    hold = base / "hold"
    hold.touch()
    slow = ["augmentation.delay=0.02", f"augmentation.hold={json.dumps(str(hold))}"]
    reference, out = base / "reference", base / "interrupted"
    with reaped(spawn(train_args(out, *sets, *slow))) as proc, plugins_from_env():
        code, output = cli(*train_args(reference, *sets, "augmentation.delay=0"))
        assert code == 0, output
        hold.unlink()
        wait_for(lambda: metrics_lines(out) >= 1, proc, "epoch 1 was written to metrics.jsonl")
        time.sleep(random.Random(7 + workers).uniform(0.0, 0.3))
        proc.send_signal(signal.SIGTERM)
        term_code, term_output = finish(proc)
        after_term = load_ckpt(out / "last.pt") if (out / "last.pt").exists() else None
        epochs_after_term = epochs_in_metrics(out)
        resume_code, resume_output = cli(*train_args(out, *sets, *slow, resume=True))
    return {
        "workers": workers,
        "reference": reference,
        "out": out,
        "term": (term_code, term_output),
        "after_term": after_term,
        "epochs_after_term": epochs_after_term,
        "resume": (resume_code, resume_output),
    }


def test_sigterm_saves_and_exits_0_with_a_resume_hint(sigterm_run):
    code, output = sigterm_run["term"]
    assert code == 0, output
    assert "--resume" in output and "Traceback" not in output, output
    ckpt = sigterm_run["after_term"]
    assert ckpt is not None, "no last.pt after SIGTERM"
    stopped = re.search(r"stopped at epoch (\d+), step (\d+)", output)
    if stopped:  # mid-epoch: last.pt records where to go on from
        assert int(ckpt["epoch"]) == int(stopped[1]) - 2 and ckpt["resume_step"] == int(stopped[2])
    else:
        assert re.search(r"stopped after epoch (\d+)", output), output
    assert sigterm_run["epochs_after_term"] == list(range(1, len(sigterm_run["epochs_after_term"]) + 1))


def test_resume_after_sigterm_runs_each_epoch_once(sigterm_run):
    code, output = sigterm_run["resume"]
    assert code == 0, output
    assert "resuming from" in output
    assert epochs_in_metrics(sigterm_run["out"]) == [1, 2, 3]
    assert int(load_ckpt(sigterm_run["out"] / "last.pt")["epoch"]) == 2


def test_resume_after_sigterm_is_bitwise_the_uninterrupted_run(sigterm_run):
    code, output = sigterm_run["resume"]
    assert code == 0, output
    ref = load_ckpt(sigterm_run["reference"] / "last.pt")
    got = load_ckpt(sigterm_run["out"] / "last.pt")
    assert got["epoch"] == ref["epoch"] == 2
    assert got["model_ema"], "EMA is on: last.pt must hold its state"
    differ = []
    for key in ("model", "model_ema", "optimizer", "scheduler", "num_updates"):
        differ += _tensors_equal(ref[key], got[key], key)
    assert not differ, f"differ from the uninterrupted run: {differ[:8]}"
    ref_m = [json.loads(x) for x in (sigterm_run["reference"] / "metrics.jsonl").read_text().splitlines()]
    got_m = [json.loads(x) for x in (sigterm_run["out"] / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "train_loss", "acc1", "acc1_ema", "train_images"):
        assert [m[key] for m in got_m] == [m[key] for m in ref_m], key


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    with reaped(spawn(train_args(out, *EXACT_SETS, "data.num_workers=2", "augmentation.delay=0.02"))) as proc:
        wait_for(lambda: metrics_lines(out) >= 1, proc, "epoch 1 was written to metrics.jsonl")
        time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        code, output = finish(proc)
    assert (out / "last.pt").exists()
    load_ckpt(out / "last.pt")
    assert code == 0 and "--resume" in output and "Traceback" not in output, output


# --------------------------------------------------------------------------- 3. safe loading


def _evil(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped file with payloads (deep inside) that would create ``marker``."""
    payload = {
        "format": "deitctl-checkpoint-1",
        "epoch": 0,
        "model": {"head.weight": torch.zeros(2, 2), "head.bias": _Touch(marker)},
        "rng": {"python": _Touch(marker)},
    }
    torch.save(payload, path)
    return path


def test_the_payload_is_live(tmp_path):
    """Control: loading the crafted file unsafely does create the marker."""
    marker = tmp_path / "canary"
    torch.load(_evil(tmp_path / "canary.pt", marker), weights_only=False)
    assert marker.exists()


def _tiny_teacher(path: Path) -> Path:
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).state_dict(), path)
    return path


TEACHER_SETS = [
    "distillation.strategy=hard",
    "teacher.plugin=timm",
    "teacher.model=resnet18",
    "teacher.channels=[8, 16, 32, 64]",
]


def test_teacher_checkpoint_control_trains(tmp_path):
    """Control for the next test: the same recipe with an honest teacher file trains."""
    teacher = _tiny_teacher(tmp_path / "teacher.pth")
    code, output = cli(*train_args(tmp_path / "run", *TEACHER_SETS, f"teacher.checkpoint={json.dumps(str(teacher))}"))
    assert code == 0, output
    assert "student-teacher agreement" in output and f"checkpoints and metrics in {tmp_path / 'run'}" in output


@pytest.mark.parametrize("where", ["teacher", "student", "resume", "predict"])
def test_pickled_code_in_a_checkpoint_is_refused(where, tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker)
    out = tmp_path / "run"
    if where == "teacher":
        code, output = cli(*train_args(out, *TEACHER_SETS, f"teacher.checkpoint={json.dumps(str(evil))}"))
    elif where == "student":
        code, output = cli(*train_args(out, f"student.checkpoint={json.dumps(str(evil))}"))
    elif where == "resume":
        out.mkdir()
        evil = _evil(out / "last.pt", marker)
        code, output = cli(*train_args(out, resume=True))
    else:
        image = SAMPLE / "val" / "cat" / "0000.jpg"
        code, output = cli("predict", "--ckpt", str(evil), str(image))
    assert code == 2, output
    assert str(evil) in output and "refused" in output and "Traceback" not in output, output
    assert not marker.exists()
    assert not (out / "best.pt").exists()


# --------------------------------------------------------------------------- 4. data faults


def _truncated(folder: Path) -> Path:
    data = (SAMPLE / "train" / "cat" / "0010.jpg").read_bytes()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_an_image(folder: Path) -> Path:
    path = folder / "not_an_image.jpg"
    path.write_text("name,label\nthis is a CSV file with a .jpg name,3\n" * 20)
    return path


def _faulty_root(base: Path, kind: str) -> tuple[Path, Path]:
    """cat: 3 good images and one bad one; dog: 4 good ones (8 images, 2 batches of 4)."""
    root = small_root(base / "data")
    (root / "train" / "cat" / "0003.jpg").unlink()
    bad = (_truncated if kind == "truncated" else _not_an_image)(root / "train" / "cat")
    return root, bad


@pytest.mark.parametrize(
    "kind,workers,cache_mb",
    [("truncated", 0, 2048), ("not_an_image", 0, 2048), ("truncated", 2, 0), ("not_an_image", 0, 0)],
)
def test_an_unreadable_image_stops_the_run_naming_it(kind, workers, cache_mb, tmp_path):
    """Found by the start-up decode (the image cache), or, without it, when drawn."""
    root, bad = _faulty_root(tmp_path, kind)
    sets = (*SMALL_ROOT_SETS, f"data.num_workers={workers}", f"data.cache_mb={cache_mb}")
    code, output = cli(*train_args(tmp_path / "run", *sets, root=root))
    assert code == 2, output
    assert str(bad) in output and "bad_images" in output and "Traceback" not in output, output
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("kind", ["truncated", "not_an_image"])
def test_bad_images_skip_finishes_and_counts(kind, tmp_path):
    """Without the start-up decode (``cache_mb = 0``), a bad image is skipped when drawn."""
    root, bad = _faulty_root(tmp_path, kind)
    out = tmp_path / "run"
    sets = (*SMALL_ROOT_SETS, "run.epochs=2", "data.bad_images=skip", "data.cache_mb=0")
    code, output = cli(*train_args(out, *sets, root=root))
    assert code == 0, output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["skipped_images"] > 0 for m in metrics)
    assert all(m["train_images"] == 8 for m in metrics)  # the bad image is replaced, batches stay full
    assert re.search(rf"warning: skipping unreadable image {re.escape(str(bad))}", output), output
    assert "unreadable training images were skipped" in output
    load_ckpt(out / "last.pt")


def test_bad_images_skip_with_workers_warns_from_the_workers(tmp_path):
    """With data-loader workers the warning comes from the worker processes (real stderr)."""
    root, bad = _faulty_root(tmp_path, "truncated")
    out = tmp_path / "run"
    code, output = finish(
        spawn(
            train_args(
                out, *SMALL_ROOT_SETS, "data.bad_images=skip", "data.num_workers=2", "data.cache_mb=0", root=root
            )
        )
    )
    assert code == 0, output
    assert f"warning: skipping unreadable image {bad}" in output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["skipped_images"] > 0


def test_unusual_and_huge_images_train(tmp_path):
    """Grayscale, RGBA, CMYK, palette with transparency, LA, 1-bit, 16-bit grayscale and a
    6000x5000 JPEG (30 MP) in the training folders: all read as RGB, the run succeeds."""
    from PIL import Image

    root = small_root(tmp_path / "data", train=4)
    folder = root / "train" / "dog"
    src = Image.open(SAMPLE / "train" / "dog" / "0010.jpg").convert("RGB")
    rgba = src.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    src.convert("L").save(folder / "gray.jpg")
    rgba.save(folder / "alpha.png")
    src.convert("CMYK").save(folder / "cmyk.jpg")
    src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png", transparency=0)
    src.convert("LA").save(folder / "gray_alpha.png")
    src.convert("1").save(folder / "bilevel.png")
    src.convert("I;16").save(folder / "gray16.png")
    Image.linear_gradient("L").resize((6000, 5000)).convert("RGB").save(folder / "huge.jpg", quality=40)
    modes = {p.name: Image.open(p).mode for p in folder.iterdir() if not p.name[0].isdigit()}
    assert set(modes.values()) == {"L", "RGBA", "CMYK", "P", "LA", "1", "I;16", "RGB"}, modes
    out = tmp_path / "run"
    # 4 cats + 12 dogs = 16 images: 4 batches of 4, every image is read every epoch
    code, output = cli(*train_args(out, *SMALL_ROOT_SETS, root=root))
    assert code == 0, output
    assert "2 classes, 16 training images" in output and "Traceback" not in output, output
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["train_images"] == 16 and "skipped_images" not in metrics


def test_an_empty_class_folder_is_kept_as_a_class(tmp_path):
    """Documented behaviour: a class folder without images (here only a .DS_Store) still is a
    class — class indices follow the folder names, the head has an output for it — and the run
    trains on the images that exist; validation may lack the class."""
    root = small_root(tmp_path / "data")
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    out = tmp_path / "run"
    code, output = cli(*train_args(out, *SMALL_ROOT_SETS, root=root))
    assert code == 0, output
    assert "3 classes, 8 training images" in output
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["classes"] == ["cat", "dog", "empty"]
    assert ckpt["model"]["head.weight"].shape[0] == 3


def test_a_validation_class_unknown_to_training_is_refused(tmp_path):
    root = small_root(tmp_path / "data")
    (root / "val" / "zebra").mkdir()
    shutil.copy(SAMPLE / "val" / "horse" / "0000.jpg", root / "val" / "zebra" / "0000.jpg")
    code, output = cli(*train_args(tmp_path / "run", *SMALL_ROOT_SETS, root=root))
    assert code == 2, output
    assert "[data.val_split]" in output and "zebra" in output and "Traceback" not in output, output


# --------------------------------------------------------------------------- 5. numerical faults

# Epoch 1 warms up at 1e-4; from epoch 2 the learning rate is 1e30 (a schedule that is
# restored on --resume, so the resumed run really uses it).
EXPLODE = [
    "optimizer.lr=1e30",
    "schedule.min_lr=1e30",
    "schedule.warmup_lr=1e-4",
    "schedule.warmup_epochs=1",
    'schedule.interval="epoch"',
    "data.train_per_class=4",
]


def test_a_non_finite_loss_exits_1_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    code, output = cli(*train_args(out, *EXPLODE, "run.epochs=1"))
    assert code == 0, output
    good = (out / "last.pt").read_bytes()
    assert int(load_ckpt(out / "last.pt")["epoch"]) == 0

    code, output = cli(*train_args(out, *EXPLODE, "run.epochs=2", resume=True))
    assert code == 1, output
    assert re.search(r"the loss is (nan|inf|-inf) at epoch 2, step \d+", output), output
    assert str(out / "last.pt") in output and "Traceback" not in output
    assert (out / "last.pt").read_bytes() == good  # the epoch-1 checkpoint, untouched
    assert int(load_ckpt(out / "last.pt")["epoch"]) == 0  # finite weights (checked by load_ckpt)
    assert epochs_in_metrics(out) == [1]
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


# --------------------------------------------------------------------------- 6. plugin faults


PLUGIN_CASES = {
    "teacher-raises": (
        ["distillation.strategy=hard", "teacher.plugin=hostile-boom"],
        ["[teacher]", "'hostile-boom'", PLUGIN_MODULE, "ValueError: boom"],
    ),
    "teacher-not-a-module": (
        ["distillation.strategy=hard", "teacher.plugin=hostile-dict"],
        ["'hostile-dict'", PLUGIN_MODULE, "returned dict, not a torch.nn.Module"],
    ),
    "teacher-wrong-shape": (
        ["distillation.strategy=soft", "teacher.plugin=hostile-wide"],
        ["[teacher]", "'hostile-wide'", "[2, 11]", "expected logits of shape [2, 10]"],
    ),
    "student-wrong-shape": (
        ["student.plugin=hostile-wide"],
        ["[student]", "'hostile-wide'", "[2, 11]", "expected logits of shape [2, 10]"],
    ),
}


@pytest.mark.parametrize("case", list(PLUGIN_CASES))
def test_a_faulty_plugin_is_a_clear_exit_2(case, hostile_plugins, tmp_path):
    sets, expected = PLUGIN_CASES[case]
    out = tmp_path / "run"
    code, output = cli(*train_args(out, *sets))
    assert code == 2, output
    for text in expected:
        assert text in output, (text, output)
    assert "Traceback" not in output
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_debug_shows_the_plugins_own_traceback_next_to_the_message(switch, hostile_plugins, tmp_path, monkeypatch):
    sets, expected = PLUGIN_CASES["teacher-raises"]
    args = train_args(tmp_path / "run", *sets)
    if switch == "env":
        monkeypatch.setenv("DEITCTL_DEBUG", "1")
    else:
        monkeypatch.setenv("DEITCTL_DEBUG", "0")  # off; the flag turns it on (and teardown restores it)
        args = ["--debug", *args]
    code, output = cli(*args)
    assert code == 2, output
    assert "Traceback (most recent call last)" in output
    assert "deitctl_hostile_plugins.py" in output and "in boom_teacher" in output  # the plugin's frame
    assert 'raise ValueError("boom")' in output
    assert output.rstrip().splitlines()[-1].startswith("error: ")  # the one-line message still ends it
    for text in expected:
        assert text in output, (text, output)


# --------------------------------------------------------------------------- 7. disk


def test_an_output_dir_that_cannot_be_made_is_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "run"
    code, output = cli(*train_args(out))
    assert code == 2, output
    assert "[run.output_dir]" in output and str(out) in output and "Traceback" not in output, output


def _disk_full(monkeypatch, fail):
    """torch.save writes some bytes and then raises ENOSPC when ``fail(name, calls)``."""
    real = torch.save
    calls: list[str] = []

    def save(obj, f, *args, **kwargs):
        name = Path(getattr(f, "name", str(f))).name
        calls.append(name)
        if fail(name, calls):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_a_full_disk_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    """The second save of last.pt (end of epoch 2) fails."""
    out = tmp_path / "run"
    calls = _disk_full(
        monkeypatch,
        lambda name, calls: name.startswith(".last.pt.") and sum(c.startswith(".last.pt.") for c in calls) == 2,
    )
    code, output = cli(*train_args(out, "run.epochs=2"))
    assert code == 1, output
    assert f"could not write {out / 'last.pt'}: No space left on device" in output, output
    assert "previous last.pt is intact" in output and "Traceback" not in output
    assert sum(c.startswith(".last.pt.") for c in calls) == 2
    monkeypatch.undo()
    assert int(load_ckpt(out / "last.pt")["epoch"]) == 0
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]
    assert epochs_in_metrics(out) in ([1], [1, 2])  # a line for epoch 2 is dropped by --resume


def test_a_full_disk_on_the_first_best_checkpoint_says_what_is_kept(monkeypatch, tmp_path):
    """The first save of best.pt (epoch 1) fails: there is no previous best.pt to keep."""
    out = tmp_path / "run"
    calls = _disk_full(
        monkeypatch,
        lambda name, calls: name.startswith(".best.pt.") and sum(c.startswith(".best.pt.") for c in calls) == 1,
    )
    code, output = cli(*train_args(out, "run.epochs=2"))
    assert code == 1, output
    assert any(c.startswith(".best.pt.") for c in calls)
    assert f"could not write {out / 'best.pt'}: No space left on device" in output, output
    monkeypatch.undo()
    assert not (out / "best.pt").exists()
    if (out / "last.pt").exists():
        assert int(load_ckpt(out / "last.pt")["epoch"]) == 0
    assert "previous best.pt is intact" not in output, output


def test_resume_after_a_crash_between_checkpoint_and_metrics_keeps_every_epoch(monkeypatch, tmp_path):
    """The run dies (a failed save) on the first save after last.pt of epoch 1 was written
    (today: best.pt of epoch 1, before that epoch's metrics line is appended)."""
    out = tmp_path / "run"
    _disk_full(monkeypatch, lambda name, calls: any(c.startswith(".last.pt.") for c in calls[:-1]))
    code, output = cli(*train_args(out, "run.epochs=2"))
    assert code == 1, output
    assert "No space left on device" in output
    monkeypatch.undo()
    assert int(load_ckpt(out / "last.pt")["epoch"]) == 0
    code, output = cli(*train_args(out, "run.epochs=2", resume=True))
    assert code == 0, output
    assert epochs_in_metrics(out) == [1, 2]
    assert (out / "best.pt").exists()


LOADER_LEFT_OPEN = """
import os, sys, torch
from deitctl.data import make_loader

class Niceness(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return torch.tensor(os.nice(0)), 0

kept = make_loader(Niceness(), batch_size=4, train=True, seed=0, num_workers=2, worker_nice=int(sys.argv[1]))
print(sorted({int(v) for batch, _ in kept for v in batch}))
"""


def test_a_script_that_leaves_loaders_open_exits_and_workers_run_niced(tmp_path):
    """Workers ignore SIGTERM (the main process stops the run); a loader still alive at
    exit must not make multiprocessing's exit handler wait for them forever."""
    script = tmp_path / "open_loader.py"
    script.write_text(LOADER_LEFT_OPEN)
    base = os.nice(0)
    done = subprocess.run(
        [sys.executable, str(script), "5"], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[{base + 5}]"


LOADER_IN_A_CYCLE = """
import gc, os, torch
import torch.utils.data._utils as torch_data_utils
from deitctl.data import make_loader

torch_data_utils.MP_STATUS_CHECK_INTERVAL = 0.5  # torch waits this long for each worker to stop

class Zeros(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return torch.zeros(2), 0

loader = make_loader(Zeros(), batch_size=4, train=True, seed=0, num_workers=2)
pids = [w.pid for w in loader._iterator._workers] if [b for b in loader] else []
loader.itself = loader  # a reference cycle: only the cyclic garbage collector frees it
del loader
gc.collect()
print(sum(os.path.exists(f"/proc/{p}") for p in pids))
"""


def test_workers_of_a_loader_freed_by_the_cyclic_gc_do_not_block_exit(tmp_path):
    """The cyclic GC closes a freed loader's queues before its shutdown message goes
    out, so its workers wait for work forever (and ignore SIGTERM); exit kills them."""
    script = tmp_path / "cycle.py"
    script.write_text(LOADER_IN_A_CYCLE)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"  # they outlived their loader, and did not stop the exit
