"""What tinyopt needs on an offline GPU machine beyond what its image holds, read from installed metadata.

The roots are tinyopt's own dependencies (``pyproject.toml``), with two changes for a JAX-only machine:
TensorFlow is left out (that machine trains under KERAS_BACKEND=jax), and ``mlflow`` becomes the
parts tinyopt uses: ``mlflow-skinny`` and ``mlflow-tracing`` (the client, the SQLite tracking store's
code and its migrations) plus ``sqlalchemy`` and ``alembic`` (what that store runs on). The full
``mlflow`` wheel adds the web UI and server dependencies, about 40 MB that a sweep never imports.

    python benchmarks/gpu/deps.py pins      # NAME==VERSION of each wheel to carry (wheels.sh reads it)
    python benchmarks/gpu/deps.py check     # requirements of that set this interpreter does not meet
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parents[1] / "pyproject.toml"
DEVICE_PACKAGES = HERE / "device-packages.txt"
_REPLACED = {
    "tensorflow": [],
    "mlflow": ["mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic"],
}


def roots() -> list[str]:
    """tinyopt's dependencies as a JAX-only machine needs them (see the module docstring)."""
    names = []
    for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        name = canonicalize_name(Requirement(line).name)
        names.extend(_REPLACED.get(name, [name]))
    return names


def device_packages() -> set[str]:
    lines = DEVICE_PACKAGES.read_text().splitlines()
    return {canonicalize_name(line) for line in lines if line.strip() and not line.startswith("#")}


def _walk(names: list[str], skip: set[str] = frozenset()) -> Iterator[tuple[str, Requirement | None]]:
    """The installed requirement graph from ``names``: (name, None) for each package reached, then
    (name, requirement) for each of its requirements. Packages in ``skip`` are neither reached nor followed.
    """
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in skip:
            continue
        seen.add(name)
        yield name, None
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                yield name, requirement
                todo.append(requirement.name)


def pins() -> list[str]:
    """NAME==VERSION, as installed here, of every package in the closure that the device image lacks."""
    names = sorted(name for name, requirement in _walk(roots(), device_packages()) if requirement is None)
    versions, missing = {}, []
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed in this environment: {', '.join(missing)}; run `pip install -e .` in it")
    return [f"{name}=={version}" for name, version in versions.items()]


def unmet() -> list[str]:
    """Each requirement in the closure of ``roots()`` that this interpreter's packages do not meet."""
    problems = []
    for dependent, requirement in _walk(roots()):
        if requirement is None:
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} missing ({dependent} needs it)")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} (needs {requirement.specifier} for {dependent})")
    return problems


def main() -> None:
    command = sys.argv[1] if len(sys.argv) == 2 else ""
    if command == "pins":
        print("\n".join(pins()))
    elif command == "check":
        print("\n".join(unmet()))
    else:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[1])


if __name__ == "__main__":
    main()
