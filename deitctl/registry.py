"""Plugin discovery and the registry of named factories (one name, one factory).

Plugins are modules found through the ``deitctl`` entry-point group; the
built-in ones ship in this distribution and are found the same way. Modules
named in ``DEITCTL_PLUGINS`` (comma-separated) are loaded too, which is handy
for a plugin that is not installed. ``DEITCTL_DISABLE_PLUGIN_AUTOLOAD`` turns
third-party entry points off; the built-ins stay.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points
from typing import Any

import pluggy

from deitctl import hookspecs
from deitctl.errors import PluginError
from deitctl.kinds import KINDS, kind

GROUP = "deitctl"
BUILTIN_DIST = "deitctl"


@dataclass(frozen=True)
class Plugin:
    """One registered factory."""

    kind: str
    name: str
    factory: Callable[..., Any]
    help: str
    provider: str

    def options(self) -> tuple[dict[str, inspect.Parameter], bool]:
        """The factory's keyword options and whether it takes ``**options``."""
        params = inspect.signature(self.factory).parameters.values()
        named = {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return named, any(p.kind is p.VAR_KEYWORD for p in params)


@dataclass(frozen=True)
class LoadFailure:
    """A plugin module that could not be imported or whose hook raised."""

    provider: str
    error: str


@dataclass
class Registry:
    """Every registered plugin, by kind and name."""

    plugins: dict[str, dict[str, Plugin]] = field(default_factory=lambda: {k.name: {} for k in KINDS})
    failures: list[LoadFailure] = field(default_factory=list)

    def add(self, plugin: Plugin) -> None:
        known = self.plugins[plugin.kind]
        if plugin.name in known:
            other = known[plugin.name]
            raise PluginError(
                f"{kind(plugin.kind).singular} plugin {plugin.name!r} is registered twice: "
                f"by {other.provider} and by {plugin.provider}; uninstall or rename one"
            )
        known[plugin.name] = plugin

    def get(self, kind_name: str, name: str) -> Plugin:
        """The plugin of that kind and name, or an error listing the known ones."""
        known = self.plugins[kind_name]
        if name in known:
            return known[name]
        hint = difflib.get_close_matches(name, known, n=1)
        msg = f"unknown {kind(kind_name).singular} plugin {name!r}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        msg += f"; known: {', '.join(sorted(known)) or 'none'}"
        failed = [f.provider for f in self.failures]
        if failed:
            msg += f" (plugins that failed to load: {', '.join(failed)})"
        raise PluginError(msg)

    def all(self) -> list[Plugin]:
        return [p for k in KINDS for _, p in sorted(self.plugins[k.name].items())]


def _autoload_disabled() -> bool:
    return bool(os.environ.get("DEITCTL_DISABLE_PLUGIN_AUTOLOAD"))


def _plugin_modules() -> list[tuple[str, str, Callable[[], Any]]]:
    """(provider, module, loader): entry points first, then ``DEITCTL_PLUGINS``."""
    found: list[tuple[str, str, Callable[[], Any]]] = []
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        builtin = dist_name.lower() == BUILTIN_DIST
        if (dist_name, ep.value) in seen or (_autoload_disabled() and not builtin):
            continue
        seen.add((dist_name, ep.value))
        version = dist.version if dist is not None else "?"
        found.append((f"{dist_name} {version}", ep.value, ep.load))
    loaded = {module for _, module, _ in found}
    for module in filter(None, (m.strip() for m in os.environ.get("DEITCTL_PLUGINS", "").split(","))):
        if module not in loaded:  # installed already: load it once
            loaded.add(module)
            found.append((module, module, partial(importlib.import_module, module)))
    return found


def _registering(registry: Registry, kind_name: str, provider: str) -> Callable[..., None]:
    singular = kind(kind_name).singular

    def register(name: str, factory: Callable[..., Any], *, help: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"{provider}: a {singular} name must be a non-empty string")
        if not callable(factory):
            raise PluginError(f"{provider}: the factory for {singular} {name!r} is not callable")
        registry.add(Plugin(kind_name, name, factory, (help or "").strip().split("\n")[0], provider))

    return register


def build_registry() -> Registry:
    """Load every plugin module and collect what its hooks register."""
    registry = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, str] = {}
    for provider, module_name, load in _plugin_modules():
        try:
            module = load()
            name = pm.register(module, name=f"{provider}:{module_name}")
        except Exception as exc:  # a broken plugin must not take the others down
            where = provider if provider == module_name else f"{provider} ({module_name})"
            registry.failures.append(LoadFailure(where, f"{type(exc).__name__}: {exc}"))
            continue
        if name is not None:
            providers[name] = provider
    known = [k.hook for k in KINDS]
    for hook_name, caller in vars(pm.hook).items():  # a misspelt hook would be ignored silently
        if hook_name not in known and getattr(caller, "spec", None) is None:
            for impl in caller.get_hookimpls():
                hint = difflib.get_close_matches(hook_name, known, n=1)
                registry.failures.append(
                    LoadFailure(
                        providers.get(impl.plugin_name, impl.plugin_name),
                        f"unknown hook {hook_name!r}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; deitctl's hooks: {', '.join(known)}",
                    )
                )
    for k in KINDS:
        for impl in getattr(pm.hook, k.hook).get_hookimpls():
            provider = providers.get(impl.plugin_name, impl.plugin_name)
            try:
                impl.function(register=_registering(registry, k.name, provider))
            except PluginError:
                raise
            except Exception as exc:
                registry.failures.append(LoadFailure(provider, f"{k.hook}: {type(exc).__name__}: {exc}"))
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the registry (tests; after installing a plugin in-process)."""
    global _REGISTRY
    _REGISTRY = None
