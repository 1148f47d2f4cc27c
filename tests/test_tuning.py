"""Speed settings chosen by measurement (``run.* = "auto"``, deitctl.tuning): the candidates a
recipe leaves open, the decision (margin, compile pay-back), the per-machine cache, rank 0's
broadcast, and timed steps that leave the run's models and random streams untouched."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, cli

from deitctl.machine import flops_per_image, machine_info
from deitctl.runtime import set_attention
from deitctl.speed_cache import cache_dir
from deitctl.tuning import (
    KEYS,
    Speed,
    StepTimer,
    Tuning,
    broadcast,
    candidates,
    decide,
    measure_candidates,
    resolve_speed,
)

CPU = torch.device("cpu")


def _run(**keys) -> SimpleNamespace:
    defaults = dict(precision="fp32", attention="fused", compile=False, gelu_backward="recompute", channels_last=False)
    return SimpleNamespace(**{**defaults, **keys})


def _row(step_s: float, compile_s: float = 0.0, **keys) -> dict:
    speed = Speed(**keys)
    return {k: getattr(speed, k) for k in KEYS} | {"step_s": step_s, "compile_s": compile_s}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10
    )
    teacher = timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).eval()
    return student, teacher


# --------------------------------------------------------------------------- what is left open


def test_only_the_keys_on_auto_are_candidates():
    fixed = candidates(_run(), has_teacher_convs=True)
    assert all(len(values) == 1 for values in fixed.values())
    every = candidates(_run(**dict.fromkeys(KEYS, "auto")), has_teacher_convs=True)
    assert every["precision"] == ["fp32", "bf16"]  # the baseline first
    assert every["attention"] == ["fused", "math"] and every["compile"] == [False, True]
    assert every["gelu_backward"] == ["recompute", "saved"] and every["channels_last"] == [False, True]
    # GELU's stored derivative acts only when compiling; the memory format only on a CNN teacher
    assert candidates(_run(gelu_backward="auto"), has_teacher_convs=True)["gelu_backward"] == ["recompute"]
    assert candidates(_run(channels_last="auto"), has_teacher_convs=False)["channels_last"] == [False]
    # the attention kernel only where there are attention blocks (a CNN trained alone has none)
    no_blocks = candidates(_run(attention="auto"), has_teacher_convs=False, has_attention=False)
    assert no_blocks["attention"] == ["fused"]
    # an fp32 recipe stays fp32: bf16 is a candidate only when the recipe says auto
    assert candidates(_run(attention="auto", compile="auto"), has_teacher_convs=False)["precision"] == ["fp32"]
    # a teacher cache's precision is kept
    assert candidates(_run(precision="auto"), has_teacher_convs=False, fixed_precision="bf16")["precision"] == ["bf16"]


def test_nothing_on_auto_is_not_measured():
    student, teacher = _models()
    tuning = resolve_speed(_run(), CPU, student, teacher, batch=(4, 3, 32, 32), num_classes=10, total_steps=10)
    assert tuning.how == "fixed" and tuning.rows == [] and tuning.speed == Speed()


# --------------------------------------------------------------------------- the decision


def test_the_baseline_stays_unless_another_is_clearly_faster():
    rows = [_row(1.00), _row(0.99, precision="bf16"), _row(1.2, attention="math")]
    assert decide(rows, total_steps=1000) == Speed()  # 1 % faster is noise: fp32 kept
    rows[1]["step_s"] = 0.80
    assert decide(rows, total_steps=1000) == Speed(precision="bf16")


def test_compile_is_chosen_only_when_it_pays_back_over_the_run():
    rows = [_row(1.0), _row(0.5, compile_s=60.0, compile=True, gelu_backward="saved")]
    assert decide(rows, total_steps=100) == Speed()  # saves 50 s, costs 60 s
    assert decide(rows, total_steps=1000) == Speed(compile=True, gelu_backward="saved")  # saves 500 s
    # a recipe that says compile = true compiles, however short the run
    rows.append(_row(0.6, compile_s=60.0, compile=True))
    assert decide(rows, total_steps=10, must_compile=True) == Speed(compile=True, gelu_backward="saved")


def test_among_compiled_settings_that_pay_back_the_fastest_wins():
    # both pay back against eager; saving GELU's derivative is 2 % faster again, and rounding
    # only, so it needs no margin over the other compiled setting (the one timed first)
    recompute = _row(0.760, compile_s=3.5, compile=True)
    saved = _row(0.746, compile_s=3.0, compile=True, gelu_backward="saved")
    rows = [_row(0.803), _row(0.786, attention="math"), recompute, saved]
    assert decide(rows, total_steps=1000) == Speed(compile=True, gelu_backward="saved")
    # over a short run the compile time weighs in: the one that ends the run first
    saved["compile_s"] = 5.0
    assert decide(rows, total_steps=100) == Speed(compile=True)
    # a compiled bf16 setting 1 % faster than the compiled fp32 one is noise: fp32 kept
    saved["compile_s"] = 3.0
    rows.append(_row(0.739, compile_s=3.0, compile=True, gelu_backward="saved", precision="bf16"))
    assert decide(rows, total_steps=1000) == Speed(compile=True, gelu_backward="saved")
    rows[-1]["step_s"] = 0.70
    assert decide(rows, total_steps=1000) == Speed(compile=True, gelu_backward="saved", precision="bf16")


# --------------------------------------------------------------------------- measuring


class _Machine(StepTimer):
    """Steps on a simulated machine with a clock: eager 1.0 s, compiled `compiled_s` (a
    compiled model's first step 5 s more), all 10 % slower while the clock is in `slow`."""

    def __init__(self, slow: tuple[float, float] = (0.0, 0.0), compiled_s: float = 0.95) -> None:
        self.device, self.slow, self.compiled_s, self.now = CPU, slow, compiled_s, 0.0
        self.built: list[Speed] = []  # the models built, in order

    def _models(self, s: Speed, *, reset: bool = True):
        self.built.append(s)
        return [len(self.built)], None  # the model: a list that remembers whether it ran

    def _step(self, s: Speed, student, teacher) -> float:
        step = (self.compiled_s if s.compile else 1.0) * (1.1 if self.slow[0] <= self.now < self.slow[1] else 1.0)
        if s.compile and student[-1] != "ran":
            step += 5.0
        student.append("ran")
        self.now += step
        return step


def test_the_fastest_compiled_setting_is_timed_again_in_turn_with_the_eager_one():
    options = candidates(_run(compile="auto"), has_teacher_convs=False)
    eager, compiled = Speed(), Speed(compile=True)
    # eager timed twice (two rounds, 0-8 s), then the compiled step in a slow spell: 1.045 s
    timer = _Machine(slow=(8, 17))
    rows = measure_candidates(timer, options)
    assert timer.built == [eager, eager, compiled, eager, compiled]
    # timed again in turn outside the spell, its 5 % gain decides
    assert {(r["compile"], round(r["step_s"], 3)) for r in rows} == {(False, 1.0), (True, 0.95)}
    assert decide(rows, total_steps=1000) == compiled
    # a spell over the second timing falls on both settings (timed one after the other, it
    # would fall on the compiled one's steps alone, and eager would be chosen)
    late = _Machine(slow=(25, 60))
    rows = measure_candidates(late, options)
    assert {(r["compile"], round(r["step_s"], 3)) for r in rows} == {(False, 1.1), (True, 1.045)}
    assert decide(rows, total_steps=1000) == compiled
    # a spell that starts within the rounds: each compiled step against the eager one beside it
    rows = measure_candidates(_Machine(slow=(30, 60)), options)
    assert decide(rows, total_steps=1000) == compiled
    # compiled settings within 3 % of each other are both timed again (GELU's backward here)
    both = _Machine()
    rows = measure_candidates(both, candidates(_run(compile="auto", gelu_backward="auto"), has_teacher_convs=False))
    saved = Speed(compile=True, gelu_backward="saved")
    assert both.built == [eager, eager, compiled, saved, eager, compiled, saved]
    # a compiled step far slower than the eager one is not timed again
    slow = _Machine(compiled_s=2.0)
    measure_candidates(slow, options)
    assert slow.built == [eager, eager, compiled]


def test_settings_timed_in_turn_run_their_own_models():
    student, teacher = _models()
    timer = StepTimer(student, teacher, (4, 3, 32, 32), 10, CPU)
    ran: list[str] = []
    student.register_forward_pre_hook(lambda m, _: ran.append("fused" if m.blocks[0].attn.fused_attn else "math"))
    speeds = [Speed(), Speed(attention="math")]
    times = timer.alternate(speeds, steps=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    # one warm-up step each, then two rounds, the order rotated
    assert ran == ["fused", "math", "fused", "math", "math", "fused"]
    assert all(p.grad is None for p in student.parameters())  # on copies


def test_measured_once_then_cached_and_the_models_and_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("DEITCTL_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    student, teacher = _models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    run = _run(precision="auto", attention="auto", channels_last="auto")
    shape = dict(batch=(8, 3, 32, 32), num_classes=10, total_steps=50)
    lines: list[str] = []
    first = resolve_speed(run, CPU, student, teacher, log=lines.append, **shape)
    assert first.how == "measured" and first.seconds > 0
    labels = [Speed(**{k: r[k] for k in KEYS}).label() for r in first.rows]
    for precision in ("fp32", "bf16"):
        for attention in ("fused", "math"):
            assert f"{precision}, {attention} attention, eager" in labels
    assert any("channels_last teacher" in label for label in labels)
    assert not any(r["compile"] for r in first.rows)  # compile was not left open
    assert all(r["step_s"] > 0 for r in first.rows)
    # a header, then each timing as it comes: eager ones close to the fastest are timed twice
    assert len(first.rows) + 1 < len(lines) <= 1 + len(first.rows) + 4
    assert first.speed in [Speed(**{k: r[k] for k in KEYS}) for r in first.rows]
    # the run's own models and random stream are as they were
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the next run with these shapes on this machine starts at once, with the same choice
    again = resolve_speed(run, CPU, student, teacher, **shape)
    assert again.how == "cached" and again.speed == first.speed and again.rows == first.rows
    entries = json.loads((tmp_path / "cache" / "speed.json").read_text())
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["device"] == machine_info(CPU)["name"] and entry["torch"] == torch.__version__
    # another batch shape is another entry; retune measures again
    other = resolve_speed(run, CPU, student, teacher, **{**shape, "batch": (4, 3, 32, 32)})
    assert other.how == "measured"
    assert resolve_speed(run, CPU, student, teacher, retune=True, **shape).how == "measured"
    assert len(json.loads((tmp_path / "cache" / "speed.json").read_text())) == 2


def test_a_timed_step_runs_the_teacher_and_the_students_backward():
    student, teacher = _models()
    timer = StepTimer(student, teacher, (4, 3, 32, 32), 10, CPU)
    calls = {"teacher": 0, "backward": 0}

    def count(what: str):
        return lambda *_: calls.__setitem__(what, calls[what] + 1)

    # hooks travel with the copies the steps run
    teacher.register_forward_hook(count("teacher"))
    student.head.register_full_backward_hook(count("backward"))
    step, compile_s = timer.measure(Speed(), warmup=1, steps=2)
    assert step > 0 and compile_s == 0.0
    assert calls == {"teacher": 3, "backward": 3}  # one warm-up step and two timed ones
    assert all(p.grad is None for p in student.parameters())  # on copies


def test_flops_per_image_counts_forward_backward_and_the_teachers_forward():
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    batch = torch.randn(4, 3, 8, 8)
    forward = 2 * 192 * 10
    # backward: the weight's gradient only (the input needs none): one more forward's worth
    assert flops_per_image(student, None, batch) == forward * 2
    assert flops_per_image(student, teacher, batch) == forward * 2 + 2 * 192 * 5
    assert all(p.grad is None for p in student.parameters())


def test_flops_per_image_is_the_same_whichever_attention_kernel_runs():
    # torch's counter skips the CPU fused kernel: a fused-attention run would lose its attention FLOPs
    student = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
        num_classes=10,
    )  # fmt: skip
    batch = torch.randn(2, 3, 32, 32)
    assert set_attention(student, "math") == 2
    math = flops_per_image(student, None, batch)
    assert set_attention(student, "fused") == 2
    fused = flops_per_image(student, None, batch)
    assert fused == math  # torch counts the explicit matmuls; the fused kernel now counts the same


# --------------------------------------------------------------------------- DDP: rank 0 decides


def _ranks(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = Tuning(Speed(precision="bf16", attention="math"), "measured", [_row(0.5)], 1.0) if rank == 0 else None
        results[rank] = broadcast(mine).speed.label()
    finally:
        dist.destroy_process_group()


def test_rank_0_decides_and_every_rank_takes_its_choice():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_ranks, args=(port, results), nprocs=2, start_method="spawn")
    assert results[0] == results[1] == "bf16, math attention, eager"


# --------------------------------------------------------------------------- the recipe


def test_auto_is_a_valid_value_and_anything_else_names_the_key(tmp_path):
    recipe = ROOT / "tests" / "hostile" / "tiny.toml"
    code, output = cli(
        "recipe", "validate", str(recipe), "--set", "run.compile=auto", "--set", "run.channels_last=auto"
    )
    assert code == 0, output
    code, output = cli("recipe", "validate", str(recipe), "--set", 'run.compile="sometimes"')
    assert code == 2 and "run.compile" in output and "false, true, 'auto'" in output, output
    code, output = cli("recipe", "validate", str(recipe), "--set", "run.compile=3")
    assert code == 2 and "run.compile" in output and "Traceback" not in output, output


@pytest.mark.parametrize("key", ["precision", "attention"])
def test_a_fixed_setting_is_kept_as_written(key, tmp_path, monkeypatch):
    monkeypatch.setenv("DEITCTL_CACHE_DIR", str(tmp_path / "cache"))
    student, teacher = _models()
    value = {"precision": "bf16", "attention": "math"}[key]
    run = _run(**{k: "auto" for k in ("precision", "attention") if k != key}, **{key: value})
    tuning = resolve_speed(run, CPU, student, teacher, batch=(4, 3, 32, 32), num_classes=10, total_steps=5)
    assert getattr(tuning.speed, key) == value
    assert {r[key] for r in tuning.rows} == {value}
