"""Recipes: TOML files read into a typed schema, with the paper's defaults.

A recipe has the sections of DESIGN.md. Sections that name a plugin
(``[data]`` its dataset, ``[student]``, ``[teacher]``, ``[augmentation]``
and ``[distillation]`` its strategy) pass every key they do not own to that
plugin's factory, checked against the factory's signature.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from deitctl.errors import RecipeError


def _f(default: Any, help: str, *, choices: tuple = (), min: float | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices, "min": min}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunSection:
    name: str = _f("deit", "run name, used for the default output directory")
    output_dir: str = _f("", "where checkpoints and metrics go (default runs/<name>)")
    epochs: int = _f(300, "training epochs", min=1)
    seed: int = _f(0, "random seed", min=0)
    device: str = _f("auto", "device", choices=("auto", "cpu", "cuda"))
    precision: str = _f("fp32", "autocast precision (auto: bf16 where the hardware has it, else fp16 on CUDA, fp32 on CPU)",
                        choices=("fp32", "bf16", "fp16", "auto"))
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)", min=1)
    compile: bool = _f(False, "torch.compile the student and the teacher")
    channels_last: bool = _f(False, "channels_last memory format for the teacher")
    attention: str = _f("auto", "attention kernel: fused (scaled_dot_product_attention) or math (explicit matmuls); "
                        "auto: math for bf16/fp16 on CPU, fused otherwise", choices=("auto", "fused", "math"))
    gelu_backward: str = _f("auto", "GELU's backward: saved (the compiled forward also stores GELU's derivative, so "
                            "the backward is one multiply; needs compile) or recompute (PyTorch's: erf and exp again "
                            "from the saved input); auto: saved when compiling on CPU", choices=("auto", "saved", "recompute"))
    threads: int = _f(0, "torch intra-op threads per process (0: torch's default)", min=0)
    retain_host_memory: bool = _f(True, "keep freed host memory in the process for reuse (glibc malloc), so a CPU "
                                  "step does not page-fault its buffers in again every step; false: the C "
                                  "library's defaults")
    progress: str = _f("auto", "progress output", choices=("auto", "rich", "plain", "none"))


@dataclass
class DataSection:
    dataset: str = _f("imagefolder", "dataset plugin")
    root: str = _f("data", "dataset root (for imagefolder: holds train/ and val/)")
    train_split: str = _f("train", "training split")
    val_split: str = _f("val", "validation split")
    img_size: int = _f(224, "student input resolution", min=1)
    batch_size: int = _f(128, "batch size per process", min=1)
    num_workers: int = _f(8, "data-loader worker processes", min=0)
    num_classes: int = _f(0, "class count (0: from the dataset)", min=0)
    repeated_aug: int = _f(3, "repeated augmentation: each image N times per epoch (1: off)", min=1)
    train_per_class: int = _f(0, "use at most N training images of each class (0: all)", min=0)
    val_per_class: int = _f(0, "use at most N validation images of each class (0: all)", min=0)
    pin_memory: bool = _f(True, "pin host memory (CUDA)")
    bad_images: str = _f("error", "on unreadable images: stop, or skip them", choices=("error", "skip"))
    worker_nice: int = _f(0, "raise the loader workers' niceness by N (Unix): on a CPU shared with the "
                          "training step, the step's threads run first", min=0)
    cache_mb: int = _f(2048, "decode each split's images once into RAM when their pixels take at most N MiB "
                         "(0: never)", min=0)
    options: dict = field(default_factory=dict)


@dataclass
class StudentSection:
    plugin: str = _f("deit", "student plugin")
    checkpoint: str = _f("", "initialise the student from this file")
    options: dict = field(default_factory=dict)


@dataclass
class TeacherSection:
    plugin: str = _f("timm", "teacher plugin")
    checkpoint: str = _f("", "teacher weights (.pth/.pt/.safetensors)")
    recipe: str = _f("", "recipe that trains this teacher when the checkpoint does not exist yet")
    mean: list[float] = _f([], "the teacher's input mean (default: the student's)")
    std: list[float] = _f([], "the teacher's input std (default: the student's)")
    input_size: int = _f(0, "the teacher's resolution (0: the student's)", min=0)
    options: dict = field(default_factory=dict)


@dataclass
class AugmentationSection:
    plugin: str = _f("deit", "augmentation plugin")
    options: dict = field(default_factory=dict)


@dataclass
class DistillationSection:
    strategy: str = _f("none", "distillation strategy plugin")
    options: dict = field(default_factory=dict)


@dataclass
class OptimizerSection:
    name: str = _f("adamw", "timm optimizer name (adamw, lamb, sgd, ...)")
    lr: float = _f(5e-4, "learning rate for a global batch of lr_base_batch", min=0)
    lr_base_batch: int = _f(512, "batch size that lr is given for (linear scaling rule)", min=1)
    lr_scaling: str = _f("linear", "scale lr by global batch / lr_base_batch", choices=("linear", "none"))
    weight_decay: float = _f(0.05, "weight decay", min=0)
    momentum: float = _f(0.9, "momentum (sgd)", min=0)
    eps: float = _f(1e-8, "epsilon (adam family)", min=0)
    betas: list[float] = _f([0.9, 0.999], "betas (adam family)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this (0: off)", min=0)
    accumulate: int = _f(1, "gradient accumulation steps", min=1)
    implementation: str = _f("auto", "fused, foreach or loop (torch optimizers); auto: fused where the optimizer has it",
                             choices=("auto", "fused", "foreach", "loop"))


@dataclass
class ScheduleSection:
    name: str = _f("cosine", "timm scheduler", choices=("cosine", "step", "multistep", "tanh", "poly", "const"))
    warmup_epochs: float = _f(5.0, "linear warm-up epochs", min=0)
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up", min=0)
    min_lr: float = _f(1e-5, "final learning rate", min=0)
    decay_epochs: float = _f(30.0, "step: epochs between decays", min=0)
    decay_rate: float = _f(0.1, "step: decay factor", min=0)
    decay_milestones: list[int] = _f([90, 180, 270], "multistep: epochs of the decays")
    cooldown_epochs: int = _f(0, "epochs at min_lr after the schedule", min=0)
    interval: str = _f("update", "update the lr every optimizer update or every epoch", choices=("update", "epoch"))


@dataclass
class EmaSection:
    enabled: bool = _f(True, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    decay: float = _f(0.99996, "EMA decay (the official DeiT value)", min=0)
    warmup: bool = _f(False, "EMA decay warm-up (useful for short runs)")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "student": StudentSection,
    "teacher": TeacherSection,
    "augmentation": AugmentationSection,
    "distillation": DistillationSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "ema": EmaSection,
}

# section -> (plugin kind, key naming the plugin); other keys go to the factory
PLUGIN_SECTIONS = {
    "data": ("datasets", "dataset"),
    "student": ("students", "plugin"),
    "teacher": ("teachers", "plugin"),
    "augmentation": ("augmentations", "plugin"),
    "distillation": ("strategies", "strategy"),
}

# factory parameters that deitctl supplies itself, by kind
CONTEXT_PARAMS = {
    "datasets": {"root", "split", "transform", "num_classes", "img_size"},
    "students": {"num_classes", "img_size"},
    "teachers": {"num_classes"},
    "augmentations": {"img_size", "mean", "std", "num_classes"},
    "strategies": set(),
}


@dataclass
class Recipe:
    """A fully resolved recipe."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    student: StudentSection = field(default_factory=StudentSection)
    teacher: TeacherSection | None = None
    augmentation: AugmentationSection = field(default_factory=AugmentationSection)
    distillation: DistillationSection = field(default_factory=DistillationSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    ema: EmaSection = field(default_factory=EmaSection)
    source: str = "<recipe>"
    warnings: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and self.distillation.strategy != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, as TOML would hold it."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is None:
                continue
            values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "options"}
            values.update(getattr(section, "options", {}))
            out[name] = values
        return out

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# --------------------------------------------------------------------------- TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write a two-level mapping (sections of keys) as TOML."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{_toml_key(section)}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"TOML syntax error: {exc}", source=source) from None


# --------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` with a TOML value; a bare word is taken as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise RecipeError(f"--set expects KEY=VALUE with a dotted key, got {item!r}", source="--set")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{'.'.join(parts[: i + 1])} is not a table", source="--set", key=".".join(parts))
        node[parts[-1]] = value


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, str(tp))


def _check(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = getattr(tp, "__origin__", None)
    if origin is list:
        (item,) = tp.__args__
        if not isinstance(value, list):
            raise RecipeError(f"expected a list of {_plural(item)}, got {value!r}", source=source, key=key)
        return [_check(v, item, key, source) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise RecipeError(f"expected {_type_name(tp)}, got {value!r}", source=source, key=key)
    return value


def _did_you_mean(name: str, known: Any) -> str:
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _build_section(cls: type, name: str, raw: Any, source: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"expected a table [{name}], got {raw!r}", source=source, key=name)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    takes_options = "options" in hints
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            if takes_options:
                options[key] = value
                continue
            raise RecipeError(
                f"unknown key {key!r}{_did_you_mean(key, fields)}; known keys: {', '.join(fields)}",
                source=source,
                key=dotted,
            )
        f = fields[key]
        value = _check(value, hints[key], dotted, source)
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise RecipeError(
                f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}", source=source, key=dotted
            )
        minimum = meta.get("min")
        if minimum is not None and value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise RecipeError(f"must be {bound}, got {value!r}", source=source, key=dotted)
        values[key] = value
    section = cls(**values)
    if takes_options:
        section.options = options
    return section


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Check a plain mapping against the schema (no plugin checks)."""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise RecipeError(
                f"unknown section [{name}]{_did_you_mean(name, SECTIONS)}; known: {', '.join(SECTIONS)}",
                source=source,
                key=name,
            )
        sections[name] = _build_section(SECTIONS[name], name, value, source)
    recipe = Recipe(**sections, source=source)
    _check_combinations(recipe)
    return recipe


def _check_combinations(recipe: Recipe) -> None:
    src = recipe.source
    if recipe.distillation.strategy != "none" and recipe.teacher is None:
        raise RecipeError(
            f"strategy {recipe.distillation.strategy!r} needs a teacher: add a [teacher] section "
            "or set strategy = \"none\"",
            source=src,
            key="distillation.strategy",
        )
    t = recipe.teacher
    if t is not None:
        for key in ("mean", "std"):
            value = getattr(t, key)
            if value and len(value) != 3:
                raise RecipeError(f"expected 3 values (one per channel), got {value!r}", source=src, key=f"teacher.{key}")
        if any(s <= 0 for s in t.std):
            raise RecipeError(f"every std must be positive, got {t.std!r}", source=src, key="teacher.std")
        if recipe.distillation.strategy == "none":
            recipe.warnings.append("[teacher] is set but distillation.strategy is \"none\": the teacher is not used in training")
    o = recipe.optimizer
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise RecipeError(f"expected two numbers in [0, 1), got {o.betas!r}", source=src, key="optimizer.betas")
    if recipe.schedule.warmup_epochs >= recipe.run.epochs and recipe.schedule.warmup_epochs > 0:
        recipe.warnings.append(
            f"schedule.warmup_epochs ({recipe.schedule.warmup_epochs:g}) is not below run.epochs "
            f"({recipe.run.epochs}): the whole run is warm-up"
        )


def check_plugins(recipe: Recipe, registry: Any = None) -> None:
    """Check every plugin name and option against the registered factories.

    Fills in each factory's defaults, so the recipe shows everything that runs.
    """
    from deitctl.registry import SINGULAR, get_registry

    registry = registry or get_registry()
    for section_name, (kind, name_key) in PLUGIN_SECTIONS.items():
        section = getattr(recipe, section_name)
        if section is None:
            continue
        plugin_name = getattr(section, name_key)
        try:
            plugin = registry.get(kind, plugin_name)
        except Exception as exc:
            raise RecipeError(str(exc), source=recipe.source, key=f"{section_name}.{name_key}") from None
        params, var_kw = plugin.options()
        context = CONTEXT_PARAMS[kind]
        accepted = {k: p for k, p in params.items() if k not in context}
        own = [f.name for f in dataclasses.fields(section) if f.name != "options"]
        for key, value in section.options.items():
            dotted = f"{section_name}.{key}"
            near_own = difflib.get_close_matches(key, own, n=1, cutoff=0.8)
            if key not in accepted and near_own:
                raise RecipeError(f"unknown key {key!r} (did you mean {near_own[0]!r}?)", source=recipe.source, key=dotted)
            if key in context:
                raise RecipeError(
                    f"{key!r} is set by deitctl, not in [{section_name}]"
                    + ("; set [data] num_classes instead" if key == "num_classes" else ""),
                    source=recipe.source,
                    key=dotted,
                )
            if key not in accepted:
                if var_kw:
                    continue
                raise RecipeError(
                    f"unknown option {key!r} for {SINGULAR[kind]} plugin {plugin_name!r} ({plugin.provider})"
                    f"{_did_you_mean(key, [*accepted, *own])}; it accepts: {', '.join(accepted) or 'no options'}"
                    f" (and the section's own keys: {', '.join(own)})",
                    source=recipe.source,
                    key=dotted,
                )
            default = accepted[key].default
            if default is not accepted[key].empty and default is not None and not isinstance(default, (list, tuple)):
                section.options[key] = _check(value, type(default), dotted, recipe.source)
        for key, p in accepted.items():
            if p.default is p.empty and key not in section.options:
                raise RecipeError(
                    f"{SINGULAR[kind]} plugin {plugin_name!r} needs option {key!r}",
                    source=recipe.source,
                    key=f"{section_name}.{key}",
                )
            if key not in section.options and _is_toml_value(p.default):
                section.options[key] = list(p.default) if isinstance(p.default, tuple) else p.default


def _is_toml_value(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_toml_value(v) for v in value) and len({type(v) for v in value}) <= 1
    return isinstance(value, (bool, int, float, str))


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, plugins: bool = True) -> Recipe:
    """Read, override and validate a recipe file."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise RecipeError("no such recipe file" if not p.exists() else "not a file", source=source)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read: {exc}", source=source) from None
    return recipe_from_text(text, source, overrides, plugins=plugins)


def recipe_from_text(
    text: str, source: str, overrides: list[str] | None = None, *, plugins: bool = True
) -> Recipe:
    raw = parse_toml(text, source)
    apply_overrides(raw, overrides or [])
    recipe = recipe_from_dict(raw, source)
    if plugins:
        check_plugins(recipe)
    return recipe
