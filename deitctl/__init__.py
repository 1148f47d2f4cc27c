"""deitctl: train and evaluate data-efficient image transformers with distillation.

Plugin authors need only :data:`hookimpl`::

    import deitctl

    @deitctl.hookimpl
    def register_teachers(register):
        register("acme-cnn", build_acme_cnn, help="ACME in-house CNN")
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("deitctl")
"""Marker for hook implementations in plugin modules."""

__all__ = ["__version__", "hookimpl"]
