"""deitctl-acme-teacher: the ACME in-house CNN as a deitctl teacher.

A complete third-party deitctl plugin. The entry point in ``pyproject.toml``::

    [project.entry-points.deitctl]
    acme = "deitctl_acme_teacher"

makes deitctl import this module and call its hook implementations. It
registers a teacher named ``acme-cnn`` (and the same network as a student, so
that deitctl can train the teacher when you have no weights yet).

This module is imported whenever deitctl lists or looks up plugins, so it
stays light: torch and the network (:mod:`deitctl_acme_teacher.model`) are
imported only when deitctl calls the factory.

Recipe::

    [teacher]
    plugin = "acme-cnn"
    width = 32                                 # options: acme_cnn's keywords
    depth = 3
    checkpoint = "runs/acme_teacher/best.pt"   # loaded by deitctl
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import deitctl

if TYPE_CHECKING:
    from deitctl_acme_teacher.model import AcmeCNN

__version__ = "0.1.0"

__all__ = ["acme_cnn", "register_students", "register_teachers"]


def acme_cnn(*, num_classes: int, width: int = 32, depth: int = 3) -> AcmeCNN:
    """The factory deitctl calls: an :class:`~deitctl_acme_teacher.model.AcmeCNN`.

    ``num_classes`` comes from deitctl (the dataset's class count). Every other
    keyword is a recipe option: deitctl checks the recipe's keys against this
    signature (an unknown key is an error listing ``width, depth``), checks
    their types against the defaults, and shows the defaults in
    ``deitctl recipe show``. A ``ValueError`` raised here becomes a recipe
    error naming the ``[teacher]`` section.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    from deitctl_acme_teacher.model import AcmeCNN

    return AcmeCNN(num_classes=num_classes, width=width, depth=depth)


@deitctl.hookimpl
def register_teachers(register):
    register("acme-cnn", acme_cnn, help="ACME in-house CNN (conv-bn-relu stages, global pool, linear)")


@deitctl.hookimpl
def register_students(register):
    # Optional: the same network as a student, so that `deitctl train` can train
    # the teacher itself (strategy "none") when you have no ACME weights yet.
    register("acme-cnn", acme_cnn, help="ACME in-house CNN (train it as a teacher: strategy none)")
