"""The model approaches, one module each: ``TRAINS`` and ``build(params, *, model, wnids)``.

Every ``build`` takes plain params (a sampled ``[space]``, never an Optuna trial), the ``[model]``
table and the class wnids in class-index order, and returns an uncompiled ``keras.Model`` from uint8
images (N, 64, 64, 3) to float32 class probabilities (N, len(wnids)). Casting, augmentation (active
only in training), resizing and preprocessing are inside the model, built from Keras layers and ops
only, so a saved ``.keras`` file reloads with plain ``keras.models.load_model``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tinyopt.core.errors import ConfigError

APPROACHES = ("pretrained", "finetune", "scratch")


def get_approach(name: str) -> ModuleType:
    """The module of a model approach, e.g. ``get_approach("finetune").build(...)``.

    Raises:
        ConfigError: unknown approach name.
    """
    if name not in APPROACHES:
        raise ConfigError(f"unknown model approach {name!r}; choose one of: {', '.join(APPROACHES)}")
    return importlib.import_module(f"{__name__}.{name}")
