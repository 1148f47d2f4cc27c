"""A run directory protects its run: no silent overwrite, one run per directory, periodic
checkpoints that make a SIGKILL cost at most N updates, elastic restarts under torchrun,
bad data named before training, official checkpoints loaded safely.

Tiny real runs on the CIFAR-10 sample (tests/hostile/tiny.toml); signals and locks go
through real ``python -m deitctl`` processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    SAMPLE,
    SMALL_ROOT_SETS,
    TINY,
    cli,
    epochs_in_metrics,
    finish,
    free_port,
    plugins_from_env,
    read_metrics,
    reaped,
    small_root,
    spawn,
    subprocess_env,
    train_args,
    wait_for,
)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, modification time and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- 1. no silent overwrite


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    code, output = cli(*train_args(out))
    assert code == 0, output
    return out


def test_training_over_a_finished_run_is_refused_and_changes_nothing(finished_run):
    before = snapshot(finished_run)
    code, output = cli(*train_args(finished_run, "run.epochs=2"))
    assert code == 2, output
    assert str(finished_run) in output and "holds a run" in output and "last.pt" in output
    for way_out in ("--resume", "--overwrite", "--auto-resume"):
        assert way_out in output, output
    assert "Traceback" not in output
    assert snapshot(finished_run) == before


def test_overwrite_starts_afresh_and_says_what_it_replaces(finished_run, tmp_path):
    out = tmp_path / "run"
    code, output = cli(*train_args(out, "run.epochs=2"))
    assert code == 0, output
    assert epochs_in_metrics(out) == [1, 2]
    code, output = cli(*train_args(out, "run.seed=1"), "--overwrite")
    assert code == 0, output
    assert "--overwrite" in output and "replacing" in output
    assert "last.pt" in output and "metrics.jsonl (2 epochs)" in output
    assert epochs_in_metrics(out) == [1]  # the new run's epoch only
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert "seed = 1" in ckpt["recipe"] and ckpt["epoch"] == 0


def test_auto_resume_starts_a_run_then_continues_it(tmp_path):
    out = tmp_path / "run"
    code, output = cli(*train_args(out), "--auto-resume")
    assert code == 0, output
    assert "no run to continue; starting" in output
    code, output = cli(*train_args(out, "run.epochs=2"), "--auto-resume")
    assert code == 0, output
    assert "continuing the run" in output and "resuming from" in output
    assert epochs_in_metrics(out) == [1, 2]


def test_resume_overwrite_and_auto_resume_exclude_each_other(tmp_path):
    code, output = cli(*train_args(tmp_path / "run"), "--resume", "--overwrite")
    assert code == 2 and "--resume and --overwrite exclude each other" in output, output
    assert not (tmp_path / "run").exists()


def test_resume_without_a_run_is_refused(tmp_path):
    code, output = cli(*train_args(tmp_path / "run", resume=True))
    assert code == 2 and "nothing to resume" in output, output


# --------------------------------------------------------------------------- 2. one run per directory


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()  # the first run waits in its first training transform while this file exists
    slow = ["augmentation.plugin=slow_deit", f"augmentation.hold={json.dumps(str(hold))}"]
    with reaped(spawn(train_args(out, *slow))) as first:
        lock = out / ".deitctl.lock"
        wait_for(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text(), first, "the lock was taken")
        started = time.monotonic()
        code, output = finish(spawn(train_args(out, *slow)), timeout=120)
        assert code == 2, output
        assert "another deitctl run is using this directory" in output and str(out) in output
        assert f"pid {first.pid}" in output and f"host {os.uname().nodename}" in output
        assert time.monotonic() - started < 90  # start-up of Python and torch, then a few seconds
        assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without releasing anything
        first.wait()
    hold.unlink()
    code, output = cli(*train_args(out), "--auto-resume")  # in-process: any process other than the dead holder
    assert code == 0, output
    assert epochs_in_metrics(out) == [1]


# --------------------------------------------------------------------------- 3. periodic checkpoints

# 4 images a class, batches of 8: 5 updates an epoch; Mixup/CutMix, drop-path and EMA draw
# from the RNGs that a checkpoint must restore for the resumed run to be exact.
EXACT = [
    "data.train_per_class=4",
    "data.val_per_class=2",
    "run.epochs=3",
    "run.checkpoint_every=2",
    "student.drop_path=0.1",
    "augmentation.mixup=0.8",
    "augmentation.cutmix=1.0",
    "ema.enabled=true",
    "ema.warmup=true",
]
FIGURES = ("epoch", "train_loss", "lr", "acc1", "acc5", "loss", "acc1_ema", "best_acc1", "train_images")


def _figures(out: Path) -> list[dict]:
    return [{k: row[k] for k in FIGURES} for row in read_metrics(out)]


def test_checkpoint_every_commits_last_pt_in_the_middle_of_an_epoch(tmp_path):
    from deitctl.recipe import load_recipe
    from deitctl.run import run_training
    from deitctl.trainer import Trainer

    out = tmp_path / "run"
    sets = [*EXACT[:2], "run.epochs=1", "run.checkpoint_every=2"]
    recipe = load_recipe(
        TINY, [f"data.root={json.dumps(str(SAMPLE))}", f"run.output_dir={json.dumps(str(out))}", *sets]
    )
    commits: list[tuple[int, int]] = []
    real = Trainer._commit_partial

    def spy(self, epoch, resume_step, partial):  # what each periodic commit left on disk
        real(self, epoch, resume_step, partial)
        ckpt = torch.load(out / "last.pt", weights_only=True)
        commits.append((int(ckpt["epoch"]), int(ckpt["resume_step"])))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_commit_partial", spy)
        run_training(recipe)
    assert commits == [(-1, 2), (-1, 4)]  # after updates 2 and 4 of 5; the 5th ends the epoch
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and "resume_step" not in ckpt  # the epoch's own commit came last


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_figures(tmp_path):
    # deit's augmentation, a little slower; 3 epochs of 5 updates, committed every 2 and at epoch ends
    slow = [*EXACT, "augmentation.plugin=slow_deit", "augmentation.delay=0.005"]
    reference = tmp_path / "reference"
    with plugins_from_env():  # in-process (the same bits as a subprocess), to save a start-up
        code, output = cli(*train_args(reference, *slow))
    assert code == 0, output
    out = tmp_path / "killed"
    rng = random.Random(15)
    kills = 0

    def commit_mark() -> int:
        last = out / "last.pt"
        return last.stat().st_mtime_ns if last.exists() else 0

    # each try is killed a random moment after its first commit, so it made progress; after
    # three kills, one more try runs to the end
    for _ in range(3):
        before = commit_mark()
        with reaped(spawn([*train_args(out, *slow), "--auto-resume"])) as proc:
            # a try may also have nothing left to commit: the kill before fell after the last commit
            wait_for(lambda: commit_mark() != before or proc.poll() is not None, proc, "a commit of last.pt")  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.3))  # mid-step, mid-save or mid-evaluation (a step is ~0.1 s)
            if proc.poll() is not None:
                assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
                break
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    else:
        code, output = finish(spawn([*train_args(out, *slow), "--auto-resume"]))
        assert code == 0, output
    assert kills >= 2
    assert _figures(out) == _figures(reference)


# --------------------------------------------------------------------------- 4. elastic restarts


def _torchrun(
    out: Path, sets: list[str], *extra: str, tail: tuple[str, ...] = (), **env_extra: str
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *extra,
        "-m",
        "deitctl",
        *train_args(out, *sets),
        *tail,
    ]
    env = subprocess_env(OMP_NUM_THREADS="1", **env_extra)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _workers(agent: int) -> list[int]:
    """The deitctl worker processes below a torchrun agent."""
    out = []
    for pid in _children(agent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"deitctl" in cmdline:
            out.append(pid)
    return out


def test_each_torchrun_restart_reads_its_own_keys_from_the_agents_store(monkeypatch):
    from torch.distributed import TCPStore

    from deitctl.distributed import _attempt_store

    port = free_port()
    agent = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = _attempt_store(2)
    assert first is not None
    first.set("rank_1", "address of a process that is gone")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = _attempt_store(2)
    assert second is not None and second.check(["rank_1"]) is False  # not the dead group's address
    second.set("rank_1", "new")
    assert first.get("rank_1") == b"address of a process that is gone"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert _attempt_store(2) is None  # no agent store: PyTorch's env:// as it is
    del agent


ELASTIC = [*EXACT, "run.epochs=2", "data.batch_size=4", "augmentation.plugin=slow_deit"]


@pytest.fixture(scope="module")
def uninterrupted_2_processes(tmp_path_factory) -> Path:
    reference = tmp_path_factory.mktemp("elastic") / "reference"
    code, output = finish(_torchrun(reference, ELASTIC))
    assert code == 0, output
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_uninterrupted_figures(
    tmp_path, rendezvous, uninterrupted_2_processes
):
    out = tmp_path / "elastic"
    slow = [*ELASTIC, "augmentation.delay=0.01"]  # time to kill a worker mid-epoch
    # one restart allowed: the restarted group must form at its first try (it reads its own keys,
    # not those its dead predecessor left in the agent's store)
    restarts = ["--max-restarts=1", "--monitor-interval=0.5"]
    if rendezvous == "c10d":  # README's multi-node launch
        restarts += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic"]
    with reaped(_torchrun(out, slow, *restarts, tail=("--auto-resume",))) as agent:
        wait_for(lambda: (out / "last.pt").exists() and len(_workers(agent.pid)) == 2, agent, "a commit")
        victim = _workers(agent.pid)[1]
        os.kill(victim, signal.SIGKILL)  # a worker lost mid-epoch
        code, output = finish(agent, timeout=300)
    assert code == 0, output
    assert "restart" in output.lower() and "resuming from" in output  # the group came back from the commit
    _close(out, uninterrupted_2_processes)


def _close(out: Path, reference: Path) -> None:
    got, want = _figures(out), _figures(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want):
        for key in FIGURES:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a[key], b[key])


# --------------------------------------------------------------------------- 5. bad data named up front


def _broken(folder: Path, count: int) -> list[Path]:
    data = (SAMPLE / "train" / "cat" / "0010.jpg").read_bytes()
    paths = []
    for i in range(count):
        path = folder / f"broken{i:02d}.jpg"
        path.write_bytes(data[:100] if i % 2 else b"not an image at all\n")
        paths.append(path)
    return paths


def test_unreadable_images_are_named_at_start_up_and_the_run_stops_before_its_first_step(tmp_path):
    root = small_root(tmp_path / "data")
    bad = _broken(root / "train" / "cat", 25)
    out = tmp_path / "run"
    code, output = cli(*train_args(out, *SMALL_ROOT_SETS, root=root))
    assert code == 2, output
    assert "25 unreadable images found at start-up" in output and 'bad_images = "skip"' in output
    listed = [p for p in bad if str(p) in output]
    assert len(listed) == 20 and "... and 5 more" in output
    assert "Traceback" not in output
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()


def _png_bomb(path: Path) -> Path:
    """A 100,000 x 100,000 PNG of a few hundred bytes: decoding it would take 10 GB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_skip_leaves_unreadable_and_hostile_images_out_up_front_and_counts_them(tmp_path):
    root = small_root(tmp_path / "data")
    (bad,) = _broken(root / "train" / "dog", 1)
    bomb = _png_bomb(root / "train" / "cat" / "bomb.png")
    out = tmp_path / "run"
    code, output = cli(*train_args(out, *SMALL_ROOT_SETS, "data.bad_images=skip", root=root))
    assert code == 0, output
    assert "2 unreadable images left out" in output and str(bad) in output
    assert str(bomb) in output and "DecompressionBombError" in output
    assert "skipping unreadable image" not in output  # never drawn
    (metrics,) = read_metrics(out)
    assert metrics["dropped_images"] == 2 and metrics["train_images"] == 8
    assert "2 classes, 8 training images" in output


def test_an_empty_class_folder_is_named_when_it_breaks_the_teachers_class_count(tmp_path):
    import timm

    root = small_root(tmp_path / "data", classes=("cat", "dog"))
    (root / "train" / "zebra").mkdir()
    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet18", num_classes=2, channels=[8, 16, 32, 64]).state_dict(), teacher)
    sets = [
        *SMALL_ROOT_SETS,
        "distillation.strategy=hard",
        "teacher.plugin=timm",
        "teacher.model=resnet18",
        "teacher.channels=[8, 16, 32, 64]",
        f"teacher.checkpoint={json.dumps(str(teacher))}",
    ]
    code, output = cli(*train_args(tmp_path / "run", *sets, root=root))
    assert code == 2, output
    assert str(root / "train" / "zebra") in output and "empty class folder" in output
    assert str(teacher) in output  # and the error it caused


def test_an_empty_class_folder_is_reported_at_start_up(tmp_path):
    root = small_root(tmp_path / "data")
    (root / "train" / "zebra").mkdir()
    code, output = cli(*train_args(tmp_path / "run", *SMALL_ROOT_SETS, root=root))
    assert code == 0, output
    assert f"class folder {root / 'train' / 'zebra'} has no images" in output


# --------------------------------------------------------------------------- 6. official checkpoints


def _official(path: Path, state: dict, **extra) -> Path:
    """A training checkpoint as the official DeiT main.py (or timm's train.py) saves it."""
    args = argparse.Namespace(
        model="deit_tiny_patch16_224",
        lr=5e-4,
        epochs=300,
        teacher_path="",
        dist_eval=True,
        input_size=32,
        smoothing=0.1,
        mixup=0.8,
        repeated_aug=True,
        decay_milestones=[30, 60],
    )
    torch.save({**extra, "model": state, "epoch": 299, "args": args, "scaler": {"scale": 65536.0}}, path)
    return path


def _tiny_deit_state(num_classes: int = 10) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    )
    return model.state_dict()


STUDENT_SETS = ["student.patch_size=8", "student.depth=1", "student.embed_dim=32", "student.num_heads=2"]


def test_an_official_training_checkpoint_evaluates_with_model(tmp_path):
    ckpt = _official(tmp_path / "checkpoint.pth", _tiny_deit_state())
    sets = [
        x
        for s in [
            *STUDENT_SETS,
            "data.img_size=32",
            "data.num_workers=0",
            "data.val_per_class=2",
        ]
        for x in ("--set", s)
    ]
    code, output = cli(
        "eval", "--ckpt", str(ckpt), "--model", "deit_tiny_patch16_224", "--data", str(SAMPLE), "--json", *sets
    )
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1])["images"] == 20


def test_official_checkpoints_initialise_a_student_and_load_a_teacher(tmp_path):
    import timm

    student = _official(tmp_path / "deit.pth", _tiny_deit_state())
    torch.manual_seed(1)
    teacher_state = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).state_dict()
    teacher = tmp_path / "timm_train.pth.tar"  # timm's train.py: state_dict, state_dict_ema, args
    torch.save(
        {
            "epoch": 5,
            "arch": "resnet18",
            "state_dict": teacher_state,
            "state_dict_ema": teacher_state,
            "args": argparse.Namespace(model="resnet18", lr=0.1),
        },
        teacher,
    )
    sets = [
        f"student.checkpoint={json.dumps(str(student))}",
        "distillation.strategy=hard",
        "teacher.plugin=timm",
        "teacher.model=resnet18",
        "teacher.channels=[8, 16, 32, 64]",
        f"teacher.checkpoint={json.dumps(str(teacher))}",
    ]
    code, output = cli(*train_args(tmp_path / "run", *sets))
    assert code == 0, output
    assert f"student initialised from {student}" in output


class _System:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_with_a_command_beside_args_is_refused_without_escape_codes(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save(
        {"model": _tiny_deit_state(), "args": argparse.Namespace(lr=1.0), "hook": _System(f"touch {marker}")}, evil
    )
    for args in (
        ["eval", "--ckpt", str(evil), "--model", "deit_tiny_patch16_224", "--data", str(SAMPLE)],
        train_args(tmp_path / "run", f"student.checkpoint={json.dumps(str(evil))}"),
    ):
        code, output = cli(*args)
        assert code == 2, output
        assert str(evil) in output and "refused" in output
        assert "\x1b" not in output and "Traceback" not in output
    assert not marker.exists()


# --------------------------------------------------------------------------- 7. keys at fault


@pytest.mark.parametrize(
    "item,key",
    [
        ("optimizer.lr=nan", "optimizer.lr"),
        ("schedule.min_lr=inf", "schedule.min_lr"),
        ("distillation.alpha=nan", "distillation.alpha"),
    ],
)
def test_a_non_finite_number_names_its_key(item, key):
    code, output = cli("recipe", "validate", str(ROOT / "recipes" / "quickstart.toml"), "--set", item)
    assert code == 2, output
    assert f"[{key}]" in output and "finite" in output
