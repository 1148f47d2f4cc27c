"""The plugin kinds: one table that the hooks, the registry, the recipe schema, validation,
``deitctl plugins`` and the plugin guide all read.

A kind has a hook (``register_<name>``), a recipe section and the key in it that names the
plugin, and the *context*: arguments deitctl computes itself and passes to a factory when
the factory's signature names them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One kind of plugin."""

    name: str
    """Plural, as the registry and ``register_<name>`` spell it: ``"teachers"``."""
    singular: str
    """As messages and ``deitctl plugins`` spell it: ``"teacher"``."""
    section: str
    """The recipe section whose key picks the plugin."""
    key: str
    """The key of that section naming the plugin (a list of names when ``many``)."""
    context: tuple[str, ...]
    """Factory arguments that deitctl supplies (never set in the recipe)."""
    factory: str
    """The factory's signature, for the hook's documentation."""
    returns: str
    """What the factory returns, for the hook's documentation."""
    many: bool = False
    """The key holds a list of plugin names, each built with no options."""

    @property
    def hook(self) -> str:
        return f"register_{self.name}"

    @property
    def doc(self) -> str:
        """The hook's docstring."""
        context = ", ".join(f"``{c}``" for c in self.context) or "nothing"
        return (
            f"Register {self.name}: ``register(name, factory, *, help='')``.\n\n"
            f"``{self.factory}``\n\n{self.returns}\n\n"
            f"Picked by ``[{self.section}] {self.key}``. Context (passed when the factory names it): {context}."
        )


KINDS: tuple[Kind, ...] = (
    Kind(
        "teachers",
        "teacher",
        "teacher",
        "plugin",
        ("num_classes",),
        "factory(*, num_classes: int, **options) -> torch.nn.Module",
        "The module maps a normalised image batch ``[B, 3, H, W]`` to logits ``[B, num_classes]``. "
        "deitctl loads ``checkpoint``, re-normalises and resizes the batch (``mean``, ``std``, "
        "``input_size``), freezes the module and runs it in inference mode.",
    ),
    Kind(
        "students",
        "student",
        "student",
        "plugin",
        ("num_classes", "img_size"),
        "factory(*, num_classes: int, img_size: int, **options) -> torch.nn.Module",
        "A student with a distillation token has the interface of timm's ``VisionTransformerDistilled`` "
        "(``set_distilled_training``, ``forward_features``, ``head``, ``head_dist``, ``head_drop``).",
    ),
    Kind(
        "augmentations",
        "augmentation",
        "augmentation",
        "plugin",
        ("img_size", "mean", "std", "num_classes"),
        "factory(*, img_size: int, mean, std, num_classes: int, **options) -> deitctl.api.Augmentation",
        "Train and eval transforms, an optional batch transform (Mixup/CutMix) and the label smoothing.",
    ),
    Kind(
        "strategies",
        "strategy",
        "distillation",
        "strategy",
        (),
        "factory(**options) -> deitctl.api.Strategy",
        "The training loss on the student's outputs, the targets and the teacher's logits.",
    ),
    Kind(
        "datasets",
        "dataset",
        "data",
        "dataset",
        ("root", "split", "transform", "num_classes", "img_size"),
        "factory(*, split: str, transform, **options) -> torch.utils.data.Dataset",
        "Yields ``(image, target)`` and has ``classes``, the class names in target order "
        "(the run's class list and count come from the training split's).",
    ),
    Kind(
        "loggers",
        "logger",
        "run",
        "loggers",
        ("output_dir", "run_name", "recipe", "resume"),
        "factory(*, output_dir: str, run_name: str, recipe: dict, resume: bool) -> deitctl.api.Logger",
        "Receives the resolved recipe (``log_hparams``), the training figures every ``[run] log_every`` "
        "updates (``log_step``), each epoch's metrics (``log_epoch``) and the final results (``log_final``), "
        "on the main process only. Import the tracker's package in the factory (a missing one stops the run "
        "at start-up, exit code 2); open files or connections in ``log_hparams``, which comes first.",
        many=True,
    ),
)

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}


def kind(name: str) -> Kind:
    """The kind called ``name`` (plural: ``"teachers"``)."""
    return BY_NAME[name]
