"""The hook specifications: one hook per plugin kind, made from :data:`deitctl.kinds.KINDS`.

Every hook is called with a ``register`` callable, ``register(name, factory, *, help="")``.
A plugin module implements any of them with :data:`deitctl.hookimpl` and is found through
the ``deitctl`` entry-point group (the built-in plugins are registered the same way)::

    @deitctl.hookimpl
    def register_teachers(register):
        register("acme-cnn", build_acme_cnn, help="ACME in-house CNN")
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from deitctl.kinds import KINDS, Kind

hookspec = pluggy.HookspecMarker("deitctl")

Register = Callable[..., None]
"""What every hook receives: ``register(name, factory, *, help="")``."""


def _spec(kind: Kind) -> Callable[[Register], None]:
    def hook(register: Register) -> None:
        """Filled in from the kind."""

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = kind.doc
    return hookspec(hook)


for _kind in KINDS:
    globals()[_kind.hook] = _spec(_kind)
