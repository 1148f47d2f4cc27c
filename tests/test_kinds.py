"""The table of plugin kinds is the one definition: hooks, registry, recipe checks,
``deitctl plugins`` and the plugin guide all follow it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import ROOT, invoke

import deitctl.hookspecs as hookspecs
from deitctl.errors import RecipeError
from deitctl.kinds import KINDS
from deitctl.recipe import Recipe, check_plugins
from deitctl.registry import get_registry
from deitctl.schema import TeacherSection


def _docs_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `(register_\w+)\(register\)` \|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_each_kind_has_a_hook_named_from_the_table():
    for kind in KINDS:
        spec = getattr(hookspecs, kind.hook)
        assert spec.__doc__ == kind.doc
        assert "register" in spec.__code__.co_varnames
    assert {n for n in dir(hookspecs) if n.startswith("register_")} == {k.hook for k in KINDS}


def test_the_plugin_guide_lists_every_kind_as_the_table_has_it():
    rows = _docs_rows()
    assert set(rows) == {k.hook for k in KINDS}
    for kind in KINDS:
        _, section, key, context = rows[kind.hook]
        assert section == f"`[{kind.section}]`"
        assert key == f"`{kind.key}`"
        assert re.findall(r"`(\w+)`", context) == list(kind.context)


def test_registry_and_plugins_command_use_the_kinds():
    registry = get_registry()
    assert list(registry.plugins) == [k.name for k in KINDS]
    listed = json.loads(invoke("plugins", "--json").stdout)["plugins"]
    assert {row["kind"] for row in listed} == {k.singular for k in KINDS if registry.plugins[k.name]}


@pytest.mark.parametrize("kind", [k for k in KINDS if k.context and not k.many], ids=lambda k: k.name)
def test_a_context_key_in_a_recipe_section_is_refused(kind):
    recipe = Recipe(teacher=TeacherSection(options={"model": "resnet18"}))
    section = getattr(recipe, kind.section)
    own = {f.name for f in dataclasses.fields(section)}
    key = next(c for c in kind.context if c not in own)
    section.options[key] = 1
    with pytest.raises(RecipeError) as info:
        check_plugins(recipe)
    assert f"[{kind.section}.{key}]" in str(info.value)
    assert "is set by deitctl" in str(info.value)
