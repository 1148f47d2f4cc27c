"""Teacher and student weights from timm (``timm:MODEL.TAG``) and from URLs, downloaded once
and cached. Nothing is downloaded here: the Hugging Face cache is a local folder in offline
mode, and URLs are ``file://`` URLs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import HOSTILE, RECIPES, SAMPLE, cli
from safetensors.torch import save_file

from deitctl.factories import build_student, build_teacher
from deitctl.finetune import init_student
from deitctl.recipe import load_recipe
from deitctl.weights import load_source

TINY = HOSTILE / "tiny.toml"
TEACHER = ['teacher.model="resnet18"', "teacher.channels=[8, 16, 32, 64]", 'distillation.strategy="hard"']
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _teacher_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64]).state_dict()


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache in offline mode, as `hf_hub_download` leaves it after a download."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hub(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / REVISION).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    save_file(state, str(folder / "snapshots" / REVISION / "model.safetensors"))


def _recipe(*sets: str):
    return load_recipe(TINY, [f"data.root={json.dumps(str(SAMPLE))}", *sets])


def test_a_missing_teacher_checkpoint_falls_back_to_timm_weights(hub, tmp_path):
    weights = _teacher_weights()
    put_in_hub(hub, "timm/resnet18.a1_in1k", weights)  # timm's source for resnet18.a1_in1k
    sets = [*TEACHER, f'teacher.checkpoint="{tmp_path / "absent.pth"}"', 'teacher.download="timm:resnet18.a1_in1k"']
    teacher = build_teacher(_recipe(*sets), 10, (0.5,) * 3, (0.25,) * 3)
    for key, value in weights.items():
        assert torch.equal(teacher.model.state_dict()[key], value), key
    # the whole run, through the command line
    out = tmp_path / "run"
    args = ["train", str(TINY), "--output-dir", str(out), "--set", f"data.root={json.dumps(str(SAMPLE))}"]
    code, text = cli(*args, *[a for s in sets for a in ("--set", s)])
    assert code == 0, text
    assert "teacher weights: timm:resnet18.a1_in1k (downloaded once, then cached)" in text
    # a file that is there comes first
    local = tmp_path / "teacher.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(local))
    teacher = build_teacher(_recipe(*sets[:-2], f'teacher.checkpoint="{local}"', sets[-1]), 10, (0.5,) * 3, (0.25,) * 3)
    assert all(not v.any() for k, v in teacher.model.state_dict().items() if k in weights)


def test_a_student_checkpoint_given_as_a_timm_tag(hub):
    torch.manual_seed(2)
    pretrained = timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=1000
    ).state_dict()
    put_in_hub(hub, "timm/deit_tiny_patch16_224.fb_in1k", pretrained)
    recipe = _recipe('student.checkpoint="timm:deit_tiny_patch16_224.fb_in1k"')
    student = build_student(recipe, 10)
    notes = init_student(student, recipe.student.checkpoint, recipe)
    assert any("classifier heads re-initialised for 10 classes" in n for n in notes)
    state = student.state_dict()
    for key, value in pretrained.items():
        if not key.startswith("head."):
            assert torch.equal(state[key], value), key


def test_weights_from_a_url_are_cached_and_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    weights = _teacher_weights()
    source = tmp_path / "teacher.pth"
    torch.save({"model": weights}, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = tmp_path / f"teacher-{digest[:8]}.pth"  # the official files' naming: checked on download
    source.rename(named)
    state = load_source(named.as_uri())
    assert torch.equal(state["model"]["fc.weight"], weights["fc.weight"])
    named.unlink()  # from the cache now
    assert torch.equal(load_source(named.as_uri())["model"]["fc.weight"], weights["fc.weight"])
    assert (tmp_path / "torch-hub" / "checkpoints" / named.name).is_file()

    wrong = tmp_path / "teacher-00000000.pth"
    torch.save({"model": weights}, wrong)
    sets = [*TEACHER, f'teacher.checkpoint="{wrong.as_uri()}"']
    code, text = cli(
        "train", str(TINY), "--output-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]
    )
    assert code == 2 and f"{wrong.as_uri()}: could not download" in text and "hash" in text
    assert not (tmp_path / "torch-hub" / "checkpoints" / wrong.name).exists()


def test_bad_weight_sources_are_recipe_errors(hub, tmp_path):
    cases = {
        'teacher.download="timm:resnet18.no_such_tag"': "[teacher.download]",
        'teacher.download="weights.pth"': "expected timm:MODEL.TAG or an http(s)/file URL",
        'student.checkpoint="timm:no_such_model.x"': "[student.checkpoint]",
    }
    for item, message in cases.items():
        sets = [*TEACHER, 'teacher.checkpoint="absent.pth"', item]
        code, text = cli("recipe", "validate", str(TINY), *[a for s in sets for a in ("--set", s)])
        assert code == 2 and message in text, text
    code, text = cli(
        "recipe",
        "validate",
        str(TINY),
        *[
            a
            for s in [
                *TEACHER,
                'teacher.recipe="t.toml"',
                'teacher.checkpoint="x.pt"',
                'teacher.download="timm:resnet18.a1_in1k"',
            ]
            for a in ("--set", s)
        ],
    )
    assert code == 2 and "set one way to obtain missing teacher weights" in text
    # a tag that exists, not in the cache, offline: one message, nothing downloaded
    sets = [*TEACHER, 'teacher.download="timm:resnet34.a1_in1k"']
    code, text = cli(
        "train", str(TINY), "--output-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]
    )
    assert code == 2 and "timm:resnet34.a1_in1k: could not fetch from the Hugging Face Hub" in " ".join(text.split())


def test_the_paper_recipes_fetch_the_teacher_through_timm_when_its_file_is_absent():
    for size in ("ti", "s", "b"):
        recipe = load_recipe(RECIPES / f"regnet_to_deit_{size}.toml")
        assert recipe.teacher is not None
        assert recipe.teacher.checkpoint == "regnety_160-a5fe301d.pth"
        assert recipe.teacher.download == "timm:regnety_160.deit_in1k"
    cfg = timm.models.get_pretrained_cfg("regnety_160.deit_in1k")
    assert cfg.url == "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"  # the same weights
    code, text = cli("recipe", "validate", str(RECIPES / "regnet_to_deit_s.toml"))
    assert code == 0 and "weights timm:regnety_160.deit_in1k are downloaded" in text
