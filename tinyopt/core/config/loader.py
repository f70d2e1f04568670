"""Sweep configuration: TOML files, ``--set`` overrides, and the resolved config that gets logged.

``sweeps/<approach>.toml`` holds every setting of an approach with its default. A preset
(``--preset cpu``: ``sweeps/cpu/<approach>.toml``) and then a ``--config`` file are merged onto it, so
each states only what differs, and ``--set key=value`` overrides come last. Every key must exist in
the default file, and every value must have the type of its default and obey ``tinyopt.core.schema``:
a typo is an error before any training, never a silently ignored setting or a failed trial.

The defaults and presets are the package's own copy of ``sweeps/`` (see ``sweeps_dir``), never a
``sweeps/`` folder of the working directory. The resolved config comes out typed
(``tinyopt.core.config.sections.Config``): this package is the only one that reads it as TOML tables.
"""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from tinyopt.core import schema
from tinyopt.core.config.sections import Config, ModelConfig
from tinyopt.core.errors import ConfigError
from tinyopt.core.space import combinations, validate_space

APPROACHES = ("pretrained", "finetune", "scratch", "ensemble")


def sweeps_dir() -> Path:
    """The package's ``sweeps/`` folder: each approach's defaults and the presets, one subfolder each.

    A wheel carries the top-level ``sweeps/`` folder of the source tree as ``tinyopt/sweeps/``
    (pyproject.toml maps the package ``tinyopt.sweeps`` onto it). An editable install or a source tree
    holds no ``tinyopt/sweeps/``: there the folder is ``sweeps/`` beside the package, the files a wheel
    would carry. The folder is found from the package itself, not imported as ``tinyopt.sweeps``:
    setuptools' editable installs do not import a package mapped outside its parent's folder that has
    no ``__init__.py`` (setuptools 65 to 80 alike), and a ``sweeps/`` of the working directory is never read.
    """
    package = Path(str(resources.files("tinyopt")))  # installs are never zipped (pip unpacks wheels)
    packaged = package / "sweeps"
    return packaged if packaged.is_dir() else package.parent / "sweeps"


def default_config_path(approach: str) -> Path:
    """Path of the package's ``sweeps/<approach>.toml``."""
    if approach not in APPROACHES:
        raise ConfigError(f"unknown approach {approach!r}; choose one of: {', '.join(APPROACHES)}")
    return sweeps_dir() / f"{approach}.toml"


def presets(approach: str | None = None) -> list[str]:
    """The names of the packaged presets (subfolders of ``sweeps/``), of those with a file for ``approach`` if given."""
    folder = sweeps_dir()
    names = sorted(path.name for path in folder.iterdir() if path.is_dir() and any(path.glob("*.toml")))
    return [name for name in names if approach is None or (folder / name / f"{approach}.toml").is_file()]


def preset_path(approach: str, preset: str) -> Path:
    """Path of the packaged ``sweeps/<preset>/<approach>.toml``.

    Raises:
        ConfigError: no such preset, or the preset holds no file for ``approach`` (one line naming the presets).
    """
    default_config_path(approach)  # an unknown approach is named as such
    names = presets()
    if preset not in names:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(names) or 'none'}")
    path = sweeps_dir() / preset / f"{approach}.toml"
    if not path.is_file():
        raise ConfigError(f"preset {preset!r} has no {approach} config; presets for {approach}: "
                          f"{', '.join(presets(approach)) or 'none'}")
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing file to --config")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML ({err}); fix the syntax") from err


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and not _is_distribution(value):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value


def _parse_value(text: str) -> Any:
    """Read an override value as TOML (numbers, booleans, lists, quoted strings), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _known_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in schema.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict) and not _is_distribution(value):
            paths |= _known_paths(value, f"{path}.")
    return paths


def _check_keys(config: dict[str, Any], schema: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(f"{prefix}{k}" for k in schema))
            raise ConfigError(f"unknown config key {path!r} in {where}; known keys here: {known}")
        if isinstance(value, dict) and isinstance(schema[key], dict):
            if not (_is_distribution(value) or _is_distribution(schema[key])):
                _check_keys(value, schema[key], where, f"{path}.")


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating nothing: every level must already exist."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict) or _is_distribution(child):
            known = ", ".join(sorted(_known_paths(config)))
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} in --set {dotted}; "
                              f"known keys: {known}")
        node = child
    if leaf not in node:
        known = ", ".join(sorted(f"{'.'.join(parents) + '.' if parents else ''}{k}" for k in node))
        raise ConfigError(f"unknown config key {dotted!r} in --set; known keys here: {known}")
    node[leaf] = value


def load_config(approach: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                preset: str | None = None) -> Config:
    """Load the resolved config of one approach: defaults, then the preset, the file, the overrides.

    Args:
        approach: ``pretrained``, ``finetune``, ``scratch`` or ``ensemble``.
        path: a config file merged onto the defaults (``sweeps/<approach>.toml``) and the preset.
        overrides: ``key=value`` strings from ``--set``, applied last, in order.
        preset: a packaged preset (``cpu``: ``sweeps/cpu/<approach>.toml``) merged onto the defaults first.

    Returns:
        The resolved config, typed (``Config.as_dict`` gives it as plain nested dicts).

    Raises:
        ConfigError: unknown keys, a malformed override or search space, a value of the wrong type, an
            unknown name, a number out of range, a missing file, an unknown preset; or ImageNet weights that
            do not exist.
    """
    defaults = _read_toml(default_config_path(approach))
    config = copy.deepcopy(defaults)
    layers = [preset_path(approach, preset)] if preset is not None else []
    for layer in [*layers, *([Path(path)] if path is not None else [])]:
        update = _read_toml(layer)
        _check_keys(update, defaults, str(layer))
        _merge(config, update)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set train.epochs=3")
        set_key(config, key.strip(), _parse_value(text.strip()))
    _check_values(config, defaults)
    _check_sampler(config)
    _check_run_name(config)
    _check_objectives(config)
    config["approach"] = approach
    typed = Config.from_dict(config)
    if typed.model is not None:
        _check_model(approach, typed.model)
    return typed


def _check_values(config: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> None:
    for key, value in config.items():
        path, like = f"{prefix}{key}", defaults[key]
        if not isinstance(like, dict):
            schema.check(path, value, like)
        elif not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}; expected a table of settings ({', '.join(like)})")
        elif path == "space":
            _check_space(value, like)
        else:
            _check_values(value, like, f"{path}.")


def _check_sampler(config: dict[str, Any]) -> None:
    if config.get("study", {}).get("sampler") == "bruteforce" and combinations(config.get("space", {})) is None:
        floats = [name for name, entry in config["space"].items()
                  if _is_distribution(entry) and entry["type"] == "float" and "step" not in entry]
        raise ConfigError(f"study.sampler = bruteforce needs a finite [space], but {', '.join(floats)} "
                          f"draw any float; give them a step, or use study.sampler = tpe")


def _check_run_name(config: dict[str, Any]) -> None:
    unknown = [name for name in config.get("study", {}).get("run_name", []) if name not in config.get("space", {})]
    if unknown:
        raise ConfigError(f"study.run_name: {', '.join(map(repr, unknown))} is not in [space]; name params of "
                          f"[space] ({', '.join(config.get('space', {}))})")


def _check_objectives(config: dict[str, Any]) -> None:
    names = config.get("study", {}).get("objectives")
    first = schema.OBJECTIVES[0]
    if names is not None and (names[0] != first or len(set(names)) < len(names)):
        raise ConfigError(f"study.objectives: got {names!r}; expected {first} first (it ranks the trials and keeps "
                          f"their models), each name once: {json.dumps([first])} or {json.dumps(schema.OBJECTIVES)}")


def _drawn(entry: Any) -> Any:
    """A value of the type a default ``[space]`` entry holds or draws: the type its overrides must have."""
    if not _is_distribution(entry):
        return entry
    if entry["type"] == "categorical":
        return entry["choices"][0]
    return entry["low"] if entry["type"] == "int" else float(entry["low"])


def _check_space(space: dict[str, Any], defaults: dict[str, Any]) -> None:
    validate_space(space)
    for name, entry in space.items():
        key, like = f"space.{name}", _drawn(defaults[name])
        if not _is_distribution(entry):
            schema.check(key, entry, like, searchable=True)
            continue
        # A float distribution draws floats, which an integer setting cannot take.
        kinds = [kind for kind, sample in (("float", 0.5), ("int", 1)) if schema.same_type(sample, like)]
        if entry["type"] not in [*kinds, "categorical"]:
            raise ConfigError(f"{key}.type: got {entry['type']!r}; expected {' or '.join([*kinds, 'categorical'])}"
                              f", as {key} holds {schema.describe(key, like)}")
        values = [(field, entry[field]) for field in ("low", "high", "default") if field in entry]
        values += [("choices", choice) for choice in entry.get("choices", ())]
        for field, value in values:
            schema.check(key, value, like, where=f"{key}.{field}")
        for other, wanted in entry.get("when", {}).items():
            for value in wanted if isinstance(wanted, list) else [wanted]:
                schema.check(f"space.{other}", value, _drawn(defaults[other]), where=f"{key}.when.{other}")


def _check_model(approach: str, model: ModelConfig) -> None:
    """Check that the ``[model]`` table's weights can be had: a file that exists, ImageNet weights that exist.

    Args:
        approach: the approach the config is for.
        model: the ``[model]`` section, its values already checked one by one.

    Raises:
        ConfigError: one line naming the setting, the value received and what is allowed.
    """
    weights = model.weights
    if approach in schema.RANDOM_WEIGHTS_ONLY and weights != "none":
        raise ConfigError(f"model.weights: got {weights!r}; expected none: {approach} trains from random weights")
    path = Path(weights).expanduser()
    if weights not in ("imagenet", "none") and not path.is_file():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"model.weights: got {weights!r}, which is not an existing file{relative}; expected "
                          f"imagenet, none, or the path of a Keras weights file")
    facts = schema.IMAGENET_WEIGHTS.get(model.backbone) if model.backbone is not None else None
    if weights != "imagenet" or not facts or not facts["alphas"]:
        return
    for key, allowed in (("alpha", facts["alphas"]), ("weights_resolution", facts["resolutions"])):
        value = getattr(model, key)
        if value not in allowed:
            raise ConfigError(f"model.{key}: got {value!r}; expected one of {', '.join(map(str, allowed))}, "
                              f"for which {model.backbone} has ImageNet weights, or set model.weights to a "
                              f"weights file or none")
