"""``deitctl export``: a trained student as a file that others load without deitctl.

- ``timm``: a safetensors file that ``timm.create_model(MODEL, **KWARGS, pretrained=True,
  pretrained_cfg_overlay=dict(file=FILE, num_classes=N))`` loads; its eval forward gives the
  fused logits of ``deitctl eval``.
- ``onnx``: the eval-mode student, heads fused, batch axis dynamic; input the normalised
  batch ``[N, 3, H, W]``; class names, mean, std and image size in the metadata.
- ``safetensors``: the plain state dict, and a JSON sidecar (classes, normalisation, recipe).

Every export is checked by loading it back (timm, onnxruntime) against the PyTorch student
on a batch; the largest difference is reported. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl import __version__
from deitctl.checkpoint import load_file
from deitctl.errors import RunError, UserError
from deitctl.evaluation import student_heads
from deitctl.inference import load_student
from deitctl.recipe import Recipe

FORMATS = ("onnx", "timm", "safetensors")
EXPORT_FORMAT = "deitctl-export-1"
ONNX_GOAL = 1e-4  # the largest |onnxruntime - PyTorch| expected in fp32
CHECK_BATCH = 3  # not the traced batch of 2: the check also proves the batch axis is dynamic


@dataclass
class Export:
    """What ``export`` wrote and how it checked it."""

    format: str
    output: Path
    files: list[Path]
    num_classes: int
    max_abs_diff: float
    checked_with: str
    load: str
    """A Python line that loads the file."""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "output": str(self.output),
            "files": [str(f) for f in self.files],
            "num_classes": self.num_classes,
            "max_abs_diff": self.max_abs_diff,
            "checked_with": self.checked_with,
            "load": self.load,
            "notes": self.notes,
        }


class FusedLogits(nn.Module):
    """The student's eval output as ``deitctl eval`` scores it: one tensor, heads fused."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return student_heads(self.model, images)[0]


@dataclass
class Student:
    recipe: Recipe
    model: nn.Module
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str

    @property
    def img_size(self) -> int:
        return self.recipe.data.img_size

    def description(self) -> dict[str, Any]:
        """Plain data about the model (sidecar, metadata)."""
        return {
            "format": EXPORT_FORMAT,
            "deitctl_version": __version__,
            "student": {"plugin": self.recipe.student.plugin, **self.recipe.student.options},
            "weights": self.weights,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.img_size,
            "input": f"normalised RGB batch [N, 3, {self.img_size}, {self.img_size}]: (pixel / 255 - mean) / std",
        }

    def batch(self, n: int = CHECK_BATCH) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, self.img_size, self.img_size, generator=generator)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return student_heads(self.model, images)[0].float()


def _load(ckpt: Path, ema: bool) -> Student:
    raw = load_file(ckpt)
    if not (isinstance(raw, dict) and isinstance(raw.get("recipe"), str) and raw.get("model")):
        raise UserError(
            f"{ckpt}: not a deitctl checkpoint (no recipe and weights inside); --ckpt takes a file "
            "written by `deitctl train` (best.pt, last.pt)"
        )
    recipe, model, classes, mean, std = load_student(ckpt, ema=ema, loaded=raw)
    model = model.float().eval()
    return Student(recipe, model, classes, mean, std, "model_ema" if ema else "model")


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path``, renamed onto it when the block succeeds."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"--output {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- formats


def timm_arguments(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """(model name, keyword arguments) for ``timm.create_model`` that build the recipe's student."""
    plugin = recipe.student.plugin
    options = dict(recipe.student.options)
    if plugin not in ("deit", "timm") or not isinstance(options.get("model"), str):
        raise UserError(
            f"--format timm: the student plugin {plugin!r} does not build a timm model; "
            "use --format onnx or --format safetensors"
        )
    model = options.pop("model")
    for training_only in ("pretrained", "drop_path", "drop"):
        options.pop(training_only, None)
    if plugin == "deit":
        options["img_size"] = recipe.data.img_size
    return model, options


def _timm_call(model: str, kwargs: dict[str, Any], file: Path, num_classes: int) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({model!r}{args}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes={num_classes}))"
    )


def export_timm(student: Student, output: Path) -> Export:
    import timm
    from safetensors.torch import save_file

    model_name, kwargs = timm_arguments(student.recipe)
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output}: a timm export ends in .safetensors (timm reads the file by its suffix)")
    meta = {k: json.dumps(v) for k, v in student.description().items()}
    meta.update(format="pt", timm_model=model_name, timm_kwargs=json.dumps(kwargs))
    with _written(output) as tmp:
        save_file(_state(student.model), str(tmp), metadata=meta)
    n = len(student.classes)
    try:
        loaded = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(output), num_classes=n), **kwargs
        ).eval()
    except Exception as exc:
        raise RunError(f"{output}: written, but timm cannot load it: {type(exc).__name__}: {str(exc)[:300]}") from exc
    images = student.batch()
    with torch.no_grad():
        diff = _max_diff(loaded(images), student.logits(images))
    if diff > ONNX_GOAL:
        raise RunError(f"{output}: timm loads it, but its logits differ from the student's by {diff:.3g}")
    return Export("timm", output, [output], n, diff, "timm", _timm_call(model_name, kwargs, output, n))


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as exc:
            raise UserError(
                f"--format onnx needs the package {module!r}: pip install 'deitctl[onnx]' ({exc})"
            ) from None


def export_onnx(student: Student, output: Path) -> Export:
    _require_onnx()
    import onnx
    import onnxruntime

    wrapped = FusedLogits(student.model).eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
            program = torch.onnx.export(
                wrapped,
                (student.batch(2),),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        raise UserError(
            f"--format onnx: PyTorch could not export this student ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    assert program is not None  # dynamo=True returns the program
    proto = program.model_proto
    description = student.description()
    description["recipe"] = student.recipe.to_toml()
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in description.items()})
    with _written(output) as tmp:
        onnx.save(proto, str(tmp))
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = student.batch()
    (got,) = session.run(["logits"], {"images": images.numpy()})
    diff = _max_diff(torch.from_numpy(got), student.logits(images))
    notes = [] if diff <= ONNX_GOAL else [f"the largest difference {diff:.2g} is above the goal of {ONNX_GOAL:g}"]
    load = f"onnxruntime.InferenceSession({str(output)!r}).run(['logits'], {{'images': batch}})"
    return Export("onnx", output, [output], len(student.classes), diff, "onnxruntime", load, notes)


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


def export_safetensors(student: Student, output: Path) -> Export:
    from safetensors.torch import load_file as load_safetensors
    from safetensors.torch import save_file

    sidecar = sidecar_path(output)
    if sidecar == output:
        raise UserError(f"--output {output}: name the weights file (e.g. student.safetensors); the sidecar is .json")
    description = student.description()
    description["recipe"] = student.recipe.to_toml()
    with _written(output) as tmp:
        save_file(_state(student.model), str(tmp), metadata={"format": "pt", "deitctl_format": EXPORT_FORMAT})
    with _written(sidecar) as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    state = load_safetensors(str(output))
    diff = max((_max_diff(state[k], v) for k, v in _state(student.model).items()), default=0.0)
    load = f"safetensors.torch.load_file({str(output)!r})  # + json.load(open({str(sidecar)!r}))"
    return Export("safetensors", output, [output, sidecar], len(student.classes), diff, "safetensors", load)


def export_checkpoint(ckpt: Path, fmt: str, output: Path, *, ema: bool = False) -> Export:
    """Export a deitctl checkpoint's student (its EMA weights with ``ema``)."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    student = _load(Path(ckpt), ema)
    exporter = {"onnx": export_onnx, "timm": export_timm, "safetensors": export_safetensors}[fmt]
    return exporter(student, Path(output))
