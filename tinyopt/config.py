"""Sweep configuration: TOML files, ``--set`` overrides, and the resolved config that gets logged.

``sweeps/<approach>.toml`` holds every setting of an approach with its default. A ``--config`` file
(such as the CPU presets in ``sweeps/cpu/``) is merged onto it, so it states only what differs, and
``--set key=value`` overrides come last. Every key must exist in the default file: a typo is an
error before any training, never a silently ignored setting.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from tinyopt.errors import ConfigError

APPROACHES = ("pretrained", "finetune", "scratch", "ensemble")


def sweeps_dir() -> Path:
    """The ``sweeps/`` folder: the one in the working directory, else the one beside the package."""
    local = Path.cwd() / "sweeps"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "sweeps"


def default_config_path(approach: str) -> Path:
    """Path of ``sweeps/<approach>.toml``."""
    if approach not in APPROACHES:
        raise ConfigError(f"unknown approach {approach!r}; choose one of: {', '.join(APPROACHES)}")
    return sweeps_dir() / f"{approach}.toml"


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


def load_config(approach: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """Load the resolved config of one approach.

    Args:
        approach: ``pretrained``, ``finetune``, ``scratch`` or ``ensemble``.
        path: a config file; defaults to ``sweeps/<approach>.toml``.
        overrides: ``key=value`` strings from ``--set``, applied last, in order.

    Returns:
        The resolved config as plain nested dicts.

    Raises:
        ConfigError: unknown keys, a malformed override or search space, or a missing file.
    """
    schema = _read_toml(default_config_path(approach))
    config = schema if path is None else _read_toml(Path(path))
    if path is not None:
        _check_keys(config, schema, str(path))
        config = _merge_onto(schema, config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set train.epochs=3")
        set_key(config, key.strip(), _parse_value(text.strip()))
    config["approach"] = approach
    # Imported here because space.py validates distributions and config.py must stay importable alone.
    from tinyopt.space import validate_space

    validate_space(config.get("space", {}))
    return config


def _merge_onto(schema: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(schema)
    _merge(merged, config)
    return merged
