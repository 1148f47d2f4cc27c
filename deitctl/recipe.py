"""Recipes: TOML files read into the typed schema (:mod:`deitctl.schema`) and checked,
keys and types first, then plugin names and options against the registered factories.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from deitctl.errors import PluginError, RecipeError
from deitctl.kinds import KINDS, Kind
from deitctl.schema import (
    SECTIONS,
    AugmentationSection,
    DataSection,
    DistillationSection,
    EmaSection,
    OptimizerSection,
    RunSection,
    ScheduleSection,
    StudentSection,
    TeacherSection,
)
from deitctl.tomlio import apply_overrides, dump_toml, parse_toml

if TYPE_CHECKING:
    from deitctl.registry import Plugin, Registry


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


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, str(tp))


def _check(value: Any, tp: Any, key: str, source: str) -> Any:
    if isinstance(tp, types.UnionType):  # e.g. bool | str: one of the choices, checked next
        if any(isinstance(value, arm) for arm in tp.__args__):
            return value
        names = " or ".join(_type_name(arm) for arm in tp.__args__)
        raise RecipeError(f"expected {names}, got {value!r}", source=source, key=key)
    origin = getattr(tp, "__origin__", None)
    if origin is list:
        (item,) = tp.__args__
        if not isinstance(value, list):
            raise RecipeError(f"expected a list of {_plural(item)}, got {value!r}", source=source, key=key)
        return [_check(v, item, key, source) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise RecipeError(f"expected {_type_name(tp)}, got {value!r}", source=source, key=key)
    if tp is float and not math.isfinite(value):
        raise RecipeError(f"expected a finite number, got {value!r}", source=source, key=key)
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
                f"{value!r} is not one of {', '.join(map(_toml, meta['choices']))}", source=source, key=dotted
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
            'or set strategy = "none"',
            source=src,
            key="distillation.strategy",
        )
    t = recipe.teacher
    if t is not None:
        for key in ("mean", "std"):
            value = getattr(t, key)
            if value and len(value) != 3:
                raise RecipeError(
                    f"expected 3 values (one per channel), got {value!r}", source=src, key=f"teacher.{key}"
                )
        if any(s <= 0 for s in t.std):
            raise RecipeError(f"every std must be positive, got {t.std!r}", source=src, key="teacher.std")
        if t.download and not t.download.startswith(("timm:", "http://", "https://", "file://")):
            raise RecipeError(
                f"expected timm:MODEL.TAG or an http(s)/file URL, got {t.download!r} (a file goes in checkpoint)",
                source=src,
                key="teacher.download",
            )
        if t.download and t.recipe:
            raise RecipeError(
                "set one way to obtain missing teacher weights: download them, or train them with recipe",
                source=src,
                key="teacher.download",
            )
        if t.recipe and not t.checkpoint:
            raise RecipeError(
                "a teacher recipe needs [teacher] checkpoint: the file its run produces (e.g. runs/teacher/best.pt)",
                source=src,
                key="teacher.checkpoint",
            )
        if recipe.distillation.strategy == "none":
            recipe.warnings.append(
                '[teacher] is set but distillation.strategy is "none": the teacher is not used in training'
            )
    o = recipe.optimizer
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise RecipeError(f"expected two numbers in [0, 1), got {o.betas!r}", source=src, key="optimizer.betas")
    if recipe.schedule.warmup_epochs >= recipe.run.epochs and recipe.schedule.warmup_epochs > 0:
        recipe.warnings.append(
            f"schedule.warmup_epochs ({recipe.schedule.warmup_epochs:g}) is not below run.epochs "
            f"({recipe.run.epochs}): the whole run is warm-up"
        )


def check_plugins(recipe: Recipe, registry: Registry | None = None) -> None:
    """Check every plugin name and option against the registered factories.

    Fills in each factory's defaults, so the recipe shows everything that runs.
    """
    from deitctl.registry import get_registry

    registry = registry or get_registry()
    for k in KINDS:
        section = getattr(recipe, k.section)
        if section is None:
            continue
        names = getattr(section, k.key)
        for name in names if k.many else [names]:
            try:
                plugin = registry.get(k.name, name)
            except PluginError as exc:
                raise RecipeError(str(exc), source=recipe.source, key=f"{k.section}.{k.key}") from exc
            if not k.many:
                _check_options(recipe, k, section, plugin)


def _check_options(recipe: Recipe, k: Kind, section: Any, plugin: Plugin) -> None:
    """The section's options against the factory's signature; fills in its defaults."""
    params, var_kw = plugin.options()
    accepted = {name: p for name, p in params.items() if name not in k.context}
    own = [f.name for f in dataclasses.fields(section) if f.name != "options"]
    what = f"{k.singular} plugin {plugin.name!r}"
    for key, value in section.options.items():
        dotted = f"{k.section}.{key}"
        near_own = difflib.get_close_matches(key, own, n=1, cutoff=0.8)
        if key not in accepted and near_own:
            raise RecipeError(f"unknown key {key!r} (did you mean {near_own[0]!r}?)", source=recipe.source, key=dotted)
        if key in k.context:
            raise RecipeError(
                f"{key!r} is set by deitctl, not in [{k.section}]"
                + ("; set [data] num_classes instead" if key == "num_classes" else ""),
                source=recipe.source,
                key=dotted,
            )
        if key not in accepted:
            if var_kw:
                continue
            raise RecipeError(
                f"unknown option {key!r} for {what} ({plugin.provider})"
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
            raise RecipeError(f"{what} needs option {key!r}", source=recipe.source, key=f"{k.section}.{key}")
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


def recipe_from_text(text: str, source: str, overrides: list[str] | None = None, *, plugins: bool = True) -> Recipe:
    raw = parse_toml(text, source)
    apply_overrides(raw, overrides or [])
    recipe = recipe_from_dict(raw, source)
    if plugins:
        check_plugins(recipe)
    return recipe
