"""The teacher-output cache (``deitctl teach`` and ``[teacher] cache``): students trained
from it equal students trained with the live teacher; it refuses what does not match.

Tiny real runs: a 2-block DeiT (embed_dim 32, patch 8, drop-path on: the student draws from
torch's RNG) on 20 real CIFAR-10 images of 32 px, the DeiT augmentation (RandAugment,
random erasing, Mixup and CutMix), 2 epochs of 5 steps, and a narrow ResNet-18 teacher whose
weights are written by the test.
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
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HOSTILE, ROOT, SAMPLE, cli, free_port, read_metrics

from deitctl.rng import batch_seed, seeded_batch

TINY = HOSTILE / "tiny.toml"
STUDENT = {
    "token": 'student.model="deit_tiny_distilled_patch16_224"',
    "hard": 'student.model="deit_tiny_patch16_224"',
    "soft": 'student.model="deit_tiny_patch16_224"',
}


def base_sets(teacher: Path | str) -> list[str]:
    return [
        f"data.root={json.dumps(str(SAMPLE))}",
        "data.train_per_class=2",  # 20 images: 5 steps of 4
        "data.batch_size=4",
        "run.epochs=2",
        "student.depth=2",
        "student.drop_path=0.1",
        "augmentation.plugin=deit",
        "teacher.plugin=timm",
        "teacher.model=resnet18",
        "teacher.channels=[8, 16, 32, 64]",
        f"teacher.checkpoint={json.dumps(str(teacher))}",
        "distillation.strategy=hard",
        "run.threads=1",  # on a shared machine, one thread each is the fastest (and what CI has)
    ]


def args(command: str, *sets: str, **options: str) -> list[str]:
    out = [command, str(TINY)]
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", value]
    for item in sets:
        out += ["--set", item]
    return out


def teach(cache: Path, sets: list[str], *extra: str) -> tuple[int, str]:
    return cli(*args("teach", *sets, cache=str(cache)), *extra)


def train(out: Path, sets: list[str], *extra: str) -> tuple[int, str]:
    return cli(*args("train", *sets, output_dir=str(out)), *extra)


def with_cache(cache: Path) -> str:
    return f"teacher.cache={json.dumps(str(cache))}"


def assert_same_run(a: Path, b: Path, keys: tuple[str, ...] = ("train_loss", "acc1")) -> None:
    """Per-epoch metrics and the final weights equal within float rounding."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        for key in keys:
            assert (key in x) == (key in y), (key, x["epoch"])
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (key, x["epoch"])
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """run.threads=1 sets torch's thread count for the process: give it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A narrow ResNet-18 with a sharpened head: its classes vary from image to image."""
    import timm

    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64])
    with torch.no_grad():
        model.fc.weight.mul_(40)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def taught(teacher, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache") / "cache"
    code, output = teach(cache, base_sets(teacher))
    assert code == 0, output
    assert "epochs 1-2 of a stream of 1 process, 5 steps of 4 images" in output, output
    return cache


# --------------------------------------------------------------------------- RNG independence


def test_building_the_teacher_leaves_every_global_rng_where_it_was(teacher):
    """A run that builds the teacher and one that does not draw the same numbers afterwards."""
    from deitctl.assembly import assemble
    from deitctl.recipe import load_recipe

    recipe = load_recipe(TINY, base_sets(teacher) + ["data.val_per_class=1"])
    states = []
    for with_teacher in (True, False):
        torch.manual_seed(3)
        random.seed(3)
        np.random.seed(3)
        parts = assemble(recipe, with_teacher=with_teacher)
        assert (parts.teacher is not None) == with_teacher
        states.append((torch.rand(4), random.random(), np.random.rand()))
    assert torch.equal(states[0][0], states[1][0]) and states[0][1:] == states[1][1:]


def test_the_batch_transform_draws_from_its_own_seed_and_leaves_the_global_rngs():
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    np.random.seed(1)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = seeded_batch(mix, x.clone(), y, batch_seed(0, 1, 2, 0))
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    assert random.getstate() == before[2]
    np.random.rand(100)  # whatever was drawn before, the same decisions
    b = seeded_batch(mix, x.clone(), y, batch_seed(0, 1, 2, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = seeded_batch(mix, x.clone(), y, batch_seed(0, 1, 2, 1))  # another process: other decisions
    assert not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------- exactness, one process


@pytest.mark.parametrize("strategy", ["token", "hard", "soft"])
def test_a_student_from_the_cache_equals_the_live_teachers(strategy, teacher, taught, tmp_path):
    sets = base_sets(teacher) + [f"distillation.strategy={strategy}", STUDENT[strategy]]
    code, output = train(tmp_path / "live", sets)
    assert code == 0, output
    code, output = train(tmp_path / "cached", [*sets, with_cache(taught)])
    assert code == 0, output
    assert f"teacher outputs read from the cache {taught} (full logits)" in output
    assert_same_run(tmp_path / "live", tmp_path / "cached", ("train_loss", "acc1", "teacher_agreement"))


def test_with_auto_precision_teach_and_training_take_the_same_precision(teacher, tmp_path):
    """``run.precision = "auto"``: teach measures with the recipe's student and teacher, as
    live training does, and a cached run takes the cache's precision: the same student."""
    sets = [*base_sets(teacher), "run.precision=auto", "run.epochs=1"]
    code, output = teach(tmp_path / "cache", sets)
    assert code == 0, output
    taught = re.search(r"speed \((?:measured in [0-9.]+ s|cached)\): (\w+),", output)
    assert taught, output
    code, output = train(tmp_path / "live", sets)
    assert code == 0, output
    assert re.search(rf"speed \(cached\): {taught[1]},", output), output  # the same measurement
    code, output = train(tmp_path / "cached", [*sets, with_cache(tmp_path / "cache")])
    assert code == 0, output
    assert f"speed (fixed): {taught[1]}," in output or f"speed (cached): {taught[1]}," in output, output
    ma, mb = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert mb[0]["train_loss"] == pytest.approx(ma[0]["train_loss"], rel=1e-6)


def test_the_teacher_is_not_needed_and_the_last_evaluation_says_so(teacher, taught, tmp_path):
    """With every epoch in the cache the teacher's weights are never read (the checkpoint
    may be gone); the last evaluation leaves the agreement out and says why."""
    code, output = train(tmp_path / "live", base_sets(teacher))
    assert code == 0, output
    gone = tmp_path / "gone.pth"
    code, output = train(tmp_path / "cached", [*base_sets(gone), with_cache(taught)])
    assert code == 0, output
    said = "no teacher agreement in the last evaluation: training read the teacher cache"
    assert f"{said}, and the teacher's checkpoint '{gone}' is not here" in output
    assert "teacher_agreement" not in read_metrics(tmp_path / "cached")[-1]
    assert_same_run(tmp_path / "live", tmp_path / "cached")


def test_a_mid_epoch_stop_and_resume_from_the_cache_equals_the_live_run(teacher, taught, tmp_path, monkeypatch):
    """SIGTERM in epoch 2 (the run stops after step 2 and saves), then --resume."""
    from deitctl.trainer import Trainer

    sets = base_sets(teacher) + ["distillation.strategy=token", STUDENT["token"]]
    code, output = train(tmp_path / "live", sets)
    assert code == 0, output
    real = Trainer.train_step

    def signalled(self, images, targets, *, epoch=0, step=0):
        loss = real(self, images, targets, epoch=epoch, step=step)
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler: stop at the next update
        return loss

    monkeypatch.setattr(Trainer, "train_step", signalled)
    code, output = train(tmp_path / "cached", [*sets, with_cache(taught)])
    assert code == 0, output
    assert "stopped at epoch 2, step 2" in output, output
    monkeypatch.undo()
    code, output = train(tmp_path / "cached", [*sets, with_cache(taught)], "--resume")
    assert code == 0, output
    assert "resuming from" in output and "at epoch 2, step 3" in output, output
    assert_same_run(tmp_path / "live", tmp_path / "cached")


# --------------------------------------------------------------------------- a cache that does not match


def test_a_cache_for_another_recipe_is_refused_by_key_before_any_step(teacher, taught, tmp_path):
    out = tmp_path / "run"
    changed = ["run.seed=1", "augmentation.mixup=0.5", "data.batch_size=2"]
    code, output = train(out, [*base_sets(teacher), with_cache(taught), *changed])
    assert code == 2, output
    assert "[teacher.cache]" in output and str(taught / "manifest.json") in output
    for key in ("run.seed: cache 0, recipe 1", "augmentation.mixup: cache 0.8, recipe 0.5", "data.batch_size"):
        assert key in output, output
    assert "Traceback" not in output and not (out / "metrics.jsonl").exists()
    # teaching more epochs into it with another recipe is refused alike
    code, output = teach(taught, [*base_sets(teacher), "run.seed=1"], "--epochs", "3:3")
    assert code == 2 and "refusing to add epochs" in output and "run.seed" in output, output


def test_a_missing_cache_is_exit_2(teacher, tmp_path):
    code, output = train(tmp_path / "run", [*base_sets(teacher), with_cache(tmp_path / "nothing")])
    assert code == 2, output
    assert f"{tmp_path / 'nothing'}: no such teacher cache" in output and "[teacher.cache]" in output


def test_a_stream_that_diverged_stops_naming_the_first_differing_epoch_and_step(teacher, taught, tmp_path, monkeypatch):
    """The per-sample augmentation seeds change from epoch 2, position 8 on (as if the
    data or deitctl had changed): the check of the teacher's input stops the run there."""
    import deitctl.samplers as samplers

    real = samplers.sample_seed
    monkeypatch.setattr(samplers, "sample_seed", lambda s, e, p: real(s, e, p) + (e == 1 and p >= 8))
    out = tmp_path / "run"
    code, output = train(out, [*base_sets(teacher), with_cache(taught)])
    assert code == 2, output
    assert "the training stream differs from the cached one at epoch 2, step 3" in output, output
    assert [m["epoch"] for m in read_metrics(out)] == [1]  # epoch 1 is kept


def test_a_corrupt_shard_is_named(teacher, taught, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(taught, cache)
    shard = cache / "epoch-0001" / "rank-00.step-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, output = train(tmp_path / "run", [*base_sets(teacher), with_cache(cache)])
    assert code == 2, output
    assert f"{shard}: corrupt teacher-cache shard" in output and "Traceback" not in output, output


def test_a_partial_cache_falls_back_to_the_live_teacher_or_is_refused(teacher, taught, tmp_path):
    """Epoch 2's shard is truncated (a partial copy): with the teacher's checkpoint the
    live teacher runs epoch 2 (logged), the same run as the live one; without it, exit 2."""
    cache = tmp_path / "cache"
    shutil.copytree(taught, cache)
    shard = cache / "epoch-0002" / "rank-00.step-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    code, output = train(tmp_path / "live", base_sets(teacher))
    assert code == 0, output
    code, output = train(tmp_path / "fallback", [*base_sets(teacher), with_cache(cache)])
    assert code == 0, output
    assert f"teacher cache {cache} lacks epoch 2: the live teacher ({teacher}) runs for those" in output
    assert_same_run(tmp_path / "live", tmp_path / "fallback", ("train_loss", "acc1", "teacher_agreement"))
    code, output = train(tmp_path / "refused", [*base_sets(tmp_path / "gone.pth"), with_cache(cache)])
    assert code == 2, output
    assert f"the cache lacks epoch 2; epoch 2 is partial: {shard} is 100 bytes" in output, output
    assert "--epochs 2:2" in output and not (tmp_path / "refused" / "metrics.jsonl").exists()
    # teaching again mends it: the cut shard is taught anew
    code, output = teach(cache, base_sets(teacher))
    assert code == 0 and "epoch 1 taught already" in output and "there already" not in output, output
    assert shard.read_bytes() == (taught / shard.relative_to(cache)).read_bytes()


# --------------------------------------------------------------------------- teaching


def test_a_full_disk_while_teaching_is_exit_2_and_the_next_teach_continues(teacher, taught, tmp_path, monkeypatch):
    """Shards of 2 steps (3 an epoch); the fifth write (epoch 2's second shard) fails half
    way. Nothing half-written stays; run again, teach keeps what it wrote and continues;
    the result is the cache taught in one go, byte for byte."""
    import deitctl.teach as teach_module

    real, calls = teach_module.atomic_write, []

    def half(f):
        f.write(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(path, write):  # the shards' writes: epoch 1's three, then epoch 2's
        calls.append(path)
        return real(path, half if len(calls) == 5 else write)

    cache = tmp_path / "cache"
    monkeypatch.setattr(teach_module, "atomic_write", full)
    code, output = teach(cache, base_sets(teacher), "--shard-steps", "2")
    assert code == 2, output
    assert "No space left on device" in output and "nothing half-written was kept" in output, output
    assert "Traceback" not in output
    monkeypatch.undo()
    assert (cache / "epoch-0001.json").exists() and not (cache / "epoch-0002.json").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    code, output = teach(cache, base_sets(teacher), "--shard-steps", "2")
    assert code == 0, output
    assert "epoch 1 taught already" in output and "1 shard there already" in output, output
    once = tmp_path / "once"
    code, output = teach(once, base_sets(teacher), "--shard-steps", "2")
    assert code == 0, output
    files = sorted(p.relative_to(once) for p in once.rglob("*.safetensors"))
    assert len(files) == 6
    for name in files:
        assert (cache / name).read_bytes() == (once / name).read_bytes(), name


def test_epochs_taught_apart_combine(teacher, taught, tmp_path):
    """Epoch 1 and epoch 2 taught into two folders (two machines), copied into one: the
    same shards as the cache taught at once, and a student trains from it."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert teach(a, base_sets(teacher), "--epochs", "1:1")[0] == 0
    code, output = teach(b, base_sets(teacher), "--epochs", "2")
    assert code == 0 and f"{b}: epoch 2 of a stream" in output, output
    shutil.copytree(b, a, dirs_exist_ok=True)
    for name in sorted(p.relative_to(taught) for p in taught.rglob("*.safetensors")):
        assert (a / name).read_bytes() == (taught / name).read_bytes(), name
    code, output = train(tmp_path / "run", [*base_sets(teacher), with_cache(a)])
    assert code == 0, output
    assert "lacks" not in output


def test_larger_teacher_batches_give_the_same_outputs(teacher, taught, tmp_path):
    """--teacher-batch 12: three steps' batches through the teacher at once, the same logits
    (within float rounding) and the same input checksums."""
    from safetensors.torch import load_file

    code, output = teach(tmp_path / "big", base_sets(teacher), "--teacher-batch", "12", "--epochs", "1")
    assert code == 0, output
    name = "epoch-0001/rank-00.step-000000.safetensors"
    big, one = load_file(tmp_path / "big" / name), load_file(taught / name)
    assert big["logits"].shape == one["logits"].shape == (5, 4, 10)
    torch.testing.assert_close(big["logits"], one["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(big["checksum"], one["checksum"])


@pytest.mark.parametrize("top_k", ["3", "0"])
def test_top_k_storage_keeps_hard_targets_exact(top_k, teacher, tmp_path):
    """Above --full-max-classes, the argmax and the top-k logits (0: the argmax alone): a
    hard student trained from it equals the live one."""
    cache = tmp_path / "cache"
    code, output = teach(cache, base_sets(teacher), "--full-max-classes", "5", "--top-k", top_k)
    assert code == 0, output
    assert (
        "argmax and top-3 logits (fp16) per image (20.0 bytes)"
        if top_k == "3"
        else "argmax (hard targets) per image (6.0 bytes)"
    ) in output, output
    code, output = train(tmp_path / "live", base_sets(teacher))
    assert code == 0, output
    code, output = train(tmp_path / "cached", [*base_sets(teacher), with_cache(cache)])
    assert code == 0 and ("(topk logits)" if top_k == "3" else "the teacher's argmax alone") in output, output
    assert_same_run(tmp_path / "live", tmp_path / "cached")


def test_top_k_decoding_keeps_the_argmax_and_is_softmax_over_the_top_k():
    from deitctl.teacher_cache import Layout, decode, encode

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 50, generator=g) * 4
    logits[0, 0, 7] = 10.0
    logits[0, 0, 3] = 10.0 - 1e-4  # equal to 10.0 in fp16, and first: a tie after rounding
    top = logits.topk(5, dim=-1)
    fkd, fill = (Layout(50, "topk", 5, tail_tau, "float32", 2, 1, 3, 3) for tail_tau in (0.0, 3.0))
    back = decode(encode(logits, fkd), fkd)
    assert torch.equal(back.argmax(-1), logits.argmax(-1))
    for tau in (1.0, 3.0):  # tail_tau 0: softmax over the top k
        want = torch.zeros_like(logits).scatter(-1, top.indices, (top.values / tau).softmax(-1))
        torch.testing.assert_close((back / tau).softmax(-1), want, atol=2e-3, rtol=0)
    back = decode(encode(logits, fill), fill)
    assert torch.equal(back.argmax(-1), logits.argmax(-1))
    p, q = (logits / 3).softmax(-1), (back / 3).softmax(-1)  # tail_tau 3: the top k and the rest's mass at τ 3
    torch.testing.assert_close(q.gather(-1, top.indices), p.gather(-1, top.indices), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 2))
    hard = Layout(50, "topk", 0, 3.0, "float32", 2, 1, 3, 3)
    assert torch.equal(decode(encode(logits, hard), hard).softmax(-1).argmax(-1), logits.argmax(-1))


# --------------------------------------------------------------------------- torchrun


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launcher += [f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "deitctl"]
    env = {k: v for k, v in os.environ.items() if k != "DEITCTL_PLUGINS"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_under_torchrun_teach_and_the_cached_student_equal_one_process_and_the_live_teacher(teacher, tmp_path):
    """torchrun -m deitctl teach (2 processes) writes the shards one process writes with
    --world-size 2; a 2-process token student from it equals the 2-process live one."""
    sets = base_sets(teacher) + ["distillation.strategy=token", STUDENT["token"], "run.progress=plain"]
    ddp = torchrun(*args("teach", *sets, cache=str(tmp_path / "ddp")))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    code, output = teach(tmp_path / "one", sets, "--world-size", "2")
    assert code == 0 and "of a stream of 2 processes, 2 steps of 4 images" in output, output
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    assert [f.name for f in files] == ["rank-00.step-000000.safetensors", "rank-01.step-000000.safetensors"] * 2
    for name in files:
        assert (tmp_path / "ddp" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    live = torchrun(*args("train", *sets, output_dir=str(tmp_path / "live")))
    assert live.returncode == 0, live.stderr[-3000:]
    cached = torchrun(*args("train", *sets, with_cache(tmp_path / "ddp"), output_dir=str(tmp_path / "cached")))
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "world size 2" in cached.stderr and "teacher outputs read from the cache" in cached.stderr
    assert_same_run(tmp_path / "live", tmp_path / "cached", ("train_loss", "acc1", "teacher_agreement"))
    # a cache for 2 processes does not serve 1
    code, output = train(tmp_path / "one-process", [*sets, with_cache(tmp_path / "ddp")])
    assert code == 2 and "the world size (processes under torchrun): cache 2, this run 1" in output, output
