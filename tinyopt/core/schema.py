"""What each setting may hold: the names tinyopt knows, numeric ranges, and which ImageNet weights exist.

A setting's type is that of its default in ``sweeps/<approach>.toml``; this module says what a type
cannot: which names and numbers are allowed. ``tinyopt.core.config`` applies it once to every resolved
config, before anything heavy is imported, and the modules that act on a name import its tuple from
here, so that a name is known in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinyopt.core import record
from tinyopt.core.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
DECAYS = ("constant", "cosine", "exponential", "step", "cooldown")
INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal", "lecun_uniform")
AUGMENTATIONS = ("none", "flip", "flip_translate", "flip_crop")
RESIZE_METHODS = ("bilinear", "bicubic", "area", "zeropad")
HEAD_INITS = ("pretrained", "random")
SAMPLERS = ("tpe", "random", "bruteforce")
PRUNERS = ("median", "halving", "hyperband", "none")
PRECISIONS = ("auto", "bfloat16", "float16", "off")
GPU_MEMORY = ("grow", "preallocate")
CHECKPOINTS = ("auto", "epoch", "off")
REQUEUE = ("sigterm", "sigterm+sigint", "never")
ENSEMBLE_OBJECTIVES = ("top1", "log_loss")
# What an approach's study may optimise (study.objectives): the selection top-1, then optionally the latency.
OBJECTIVES = (record.SELECTION_TOP1, record.LATENCY_MS)
MIN_INPUT_SIZE = 32  # the smallest input keras.applications models accept

# The input sizes (the first is the default) and width multipliers that keras.applications publishes
# ImageNet weights for. A backbone without alphas has one set of weights and ignores model.alpha and
# model.weights_resolution.
IMAGENET_WEIGHTS = {
    "resnet50": {"resolutions": (224,), "alphas": ()},
    "mobilenet": {"resolutions": (224, 192, 160, 128), "alphas": (0.25, 0.5, 0.75, 1.0)},
}
BACKBONES = tuple(IMAGENET_WEIGHTS)

# Approaches whose models train from random weights, so that any model.weights but "none" is a mistake.
RANDOM_WEIGHTS_ONLY = ("scratch",)


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` up to ``high`` (None: no upper bound); an open end excludes its bound."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low or (value == self.low and not self.open_low)
        below = self.high is None or value < self.high or (value == self.high and not self.open_high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


@dataclass(frozen=True)
class AutoOr:
    """``"auto"`` (tinyopt decides from the device), or a value of type ``kind`` within ``rule``."""

    kind: type
    rule: Range | None = None

    def allows(self, value: Any) -> bool:
        if value == "auto":
            return True
        kinds = (int, float) if self.kind is float else self.kind  # 4 is a number of GB as much as 4.0
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.kind is not bool):
            return False
        return self.rule is None or value in self.rule

    def __str__(self) -> str:
        kind = _noun(self.kind())
        return f'"auto" or {kind}' + (f" {self.rule}" if self.rule else "")


_FRACTION = Range(0, 1, open_high=True)
_POSITIVE = Range(0, open_low=True)

# The names or numbers each setting allows, by dotted key; a key of no rule takes any value of its type.
# In [space] a rule applies to a fixed value and to every number or choice of a search distribution; to a
# list (study.objectives), it applies to each item.
RULES: dict[str, tuple[Any, ...] | Range | AutoOr] = {
    "data.train_per_class": Range(0),
    "data.selection_per_class": Range(0),
    "data.test_per_class": Range(0),
    "model.backbone": BACKBONES,
    "model.alpha": _POSITIVE,
    "model.weights_resolution": Range(MIN_INPUT_SIZE),
    "train.eval_batch_size": AutoOr(int, Range(1)),
    "train.mixed_precision": PRECISIONS,
    "train.jit_compile": AutoOr(bool),
    "train.gpu_memory": GPU_MEMORY,
    "train.system_metrics": AutoOr(bool),
    "train.activation_cache_gb": AutoOr(float, Range(0)),
    "train.early_stopping_patience": Range(0),
    "train.checkpoint": CHECKPOINTS,
    "study.sampler": SAMPLERS,
    "study.n_startup_trials": Range(0),
    "study.pruner": PRUNERS,
    "study.pruner_warmup_epochs": Range(0),
    "study.pruner_reduction_factor": Range(2),
    "study.max_consecutive_failures": Range(0),
    "study.heartbeat_interval": Range(1),
    "study.requeue": REQUEUE,
    "study.keep_models": Range(1),
    "study.objectives": OBJECTIVES,
    "study.warm_start_trials": Range(1),
    "ensemble.objective": ENSEMBLE_OBJECTIVES,
    "ensemble.top_k": Range(1),
    "ensemble.greedy_rounds": Range(1),
    "ensemble.min_members": Range(1),
    "space.optimizer": OPTIMIZERS,
    "space.decay": DECAYS,
    "space.initializer": INITIALIZERS,
    "space.augment": AUGMENTATIONS,
    "space.resize": RESIZE_METHODS,
    "space.head_init": HEAD_INITS,
    "space.epochs": Range(1),
    "space.batch_size": Range(1),
    "space.learning_rate": _POSITIVE,
    "space.momentum": _FRACTION,
    "space.weight_decay": Range(0),
    "space.dropout": _FRACTION,
    "space.label_smoothing": _FRACTION,
    "space.warmup_epochs": Range(0),
    "space.input_size": Range(MIN_INPUT_SIZE),
    "space.trainable_stages": Range(0, 5),
    "space.head_width": Range(0),
    "space.stem_stride": (1, 2),
    "space.stages": Range(1, 6),  # six 2x2 pools bring 64 px images down to 1 px
    "space.width": Range(1),
    "space.blocks": Range(1),
    "space.convs": (1, 2),
}

_NOUNS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"),
          (dict, "a table"))


def _noun(value: Any) -> str:
    return next((noun for kind, noun in _NOUNS if isinstance(value, kind)), type(value).__name__)


def same_type(value: Any, like: Any) -> bool:
    """True when ``value`` has the type of ``like``: a bool is no number, an int is a float, a list is non-empty."""
    if isinstance(like, list):
        return isinstance(value, list) and bool(value) and all(same_type(item, like[0]) for item in value)
    if isinstance(value, bool) or isinstance(like, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, float):
        return isinstance(value, int | float)
    return type(value) is type(like)


def describe(key: str, like: Any) -> str:
    """What setting ``key``, whose default is ``like``, may hold, e.g. ``an integer >= 1``."""
    rule = RULES.get(key)
    if isinstance(rule, tuple):
        names = f"one of {', '.join(map(str, rule))}"
        return f"a non-empty list, each {names}" if isinstance(like, list) else names
    if isinstance(rule, AutoOr):
        return str(rule)
    noun = f"a non-empty list, each {_noun(like[0])}" if isinstance(like, list) else _noun(like)
    return f"{noun} {rule}" if rule else noun


def check(key: str, value: Any, like: Any, *, where: str = "", searchable: bool = False) -> None:
    """Check one value against the type of the setting's default and the setting's rule.

    Args:
        key: the setting's dotted key, e.g. ``space.epochs``.
        value: a fixed value, or one bound, default or choice of a search distribution.
        like: the setting's default (for a search distribution, one value it draws).
        where: where the value sits when it is part of the setting, e.g. ``space.epochs.low``.
        searchable: the setting is a ``[space]`` entry, which may also be a search distribution.

    Raises:
        ConfigError: ``<where>: got <value> [(its type)]; expected <what the setting allows>``.
    """
    expected = describe(key, like) + (", or a search distribution of them" if searchable else "")
    rule = RULES.get(key)
    if isinstance(rule, AutoOr):
        if not rule.allows(value):
            raise ConfigError(f"{where or key}: got {value!r}; expected {expected}")
        return
    if not same_type(value, like):
        received = "" if _noun(value) == _noun(like) else f" ({_noun(value)})"  # an empty list is still a list
        raise ConfigError(f"{where or key}: got {value!r}{received}; expected {expected}")
    if rule is not None and any(item not in rule for item in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{where or key}: got {value!r}; expected {expected}")
