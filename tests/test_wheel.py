"""A wheel that runs anywhere: built, installed into a fresh virtual environment, and run from an empty folder.

The fresh environment gets tinyopt from the wheel alone. Its dependencies (TensorFlow, Keras, Optuna,
MLflow...) are the ones of the environment running the tests, made visible by a plain path line in a
``.pth`` file: Python adds that folder to ``sys.path`` without processing the ``.pth`` files in it, so
the editable install of this checkout (a ``.pth`` there) is not, and the checkout cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import pytest
from fixtures import FIXTURE_NAMES

ROOT = next(path for path in Path(__file__).resolve().parents if (path / "pyproject.toml").is_file())
# What a wheel is built from; a copy, so the build writes no build/ folder into the checkout and
# carries no stale file a build/ folder of an earlier build still holds.
SOURCES = ("pyproject.toml", "README.md", "tinyopt", "sweeps")
# A sweep of one tiny trial: the CPU preset, cut down to seconds on the generated 5-class fixture.
TINY = ("space.stages=2", "space.width=8", "space.blocks=1", "space.epochs=1", "space.batch_size=16",
        "train.eval_batch_size=32")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed():
    """pyproject.toml lists the packages (a mapped package rules out packages.find): none may be left out."""
    from setuptools import find_packages

    settings = _pyproject()["tool"]["setuptools"]
    packages = set(settings["packages"])
    presets = {f"tinyopt.sweeps.{path.name}" for path in (ROOT / "sweeps").iterdir() if path.is_dir()}
    assert packages == {*find_packages(str(ROOT), include=["tinyopt*"]), "tinyopt.sweeps", *presets}
    assert settings["package-dir"] == {"tinyopt.sweeps": "sweeps"}
    assert settings["package-data"]["tinyopt.sweeps"] == ["*.toml"]
    assert all(settings["package-data"][preset] == ["*.toml"] for preset in presets)


def _run(command, *, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    shown = " ".join(map(str, command))
    assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    # Offline: the build uses the setuptools of this environment, not one pip would download.
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "dist"], cwd=tmp_path, env=env)
    [wheel] = (tmp_path / "dist").glob("tinyopt-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A new virtual environment holding tinyopt from ``wheel`` only, with this environment's dependencies."""
    root = tmp_path / "venv"
    venv.create(root, with_pip=False, symlinks=os.name != "nt")
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # pip of this environment installs into the new one (its scripts point at the new interpreter).
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path, env=env)
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         cwd=tmp_path, env=env).stdout.strip()
    # Written after the install: pip would otherwise find this checkout's editable tinyopt there and skip the wheel.
    ours = [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages") and Path(path).is_dir()]
    (Path(site_packages) / "tinyopt_test_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    return root


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path, tiny_zip, tiny_folder):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment: the wheel cannot be built offline")
    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(COLUMNS="400", TINYOPT_CACHE=str(tmp_path / "cache"), KERAS_HOME=str(tmp_path / "keras"),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheel = _build_wheel(tmp_path, env)
    root = _fresh_venv(tmp_path, wheel, env)
    bin_dir = root / ("Scripts" if os.name == "nt" else "bin")
    work = tmp_path / "work"
    work.mkdir()

    where = _run([bin_dir / "python", "-c", "import tinyopt; from tinyopt.core.config import sweeps_dir; "
                  "print(tinyopt.__file__); print(sweeps_dir())"], cwd=work, env=env).stdout.split("\n")
    module, sweeps = Path(where[0]), Path(where[1])
    assert module.is_relative_to(root) and not module.is_relative_to(ROOT), module
    assert sweeps == module.parent / "sweeps" and (sweeps / "cpu" / "scratch.toml").is_file(), sweeps

    tinyopt = bin_dir / "tinyopt"
    assert _run([tinyopt, "--version"], cwd=work, env=env).stdout == f"tinyopt {_pyproject()['project']['version']}\n"

    sweep = [tinyopt, "sweep", "scratch", "--preset", "cpu", "--trials", "1", "--data", tiny_zip]
    for item in TINY:
        sweep += ["--set", item]
    done = _run(sweep, cwd=work, env=env)
    assert "1 new trials" in done.stdout and "1 complete" in done.stdout, done.stdout
    # The default stores, made in the folder the command ran in.
    assert (work / "studies" / "tinyopt.db").is_file() and (work / "mlruns" / "mlflow.db").is_file()

    _run([tinyopt, "best", "--export", "out"], cwd=work, env=env)
    assert (work / "out").is_dir()
    image = tiny_folder / "test" / "images" / "test_0.JPEG"
    shown = _run([tinyopt, "predict", "out", image], cwd=work, env=env).stdout
    assert any(name in shown for name in FIXTURE_NAMES.values()), shown
    print(f"wheel built, installed and run in {time.perf_counter() - started:.0f} s")
