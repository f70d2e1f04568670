"""The command group: help everywhere, fast help, `python -m tinyopt` and --version."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from tinyopt.cli import cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help_text():
    names = []
    for path, command in _commands(cli):
        names.append(" ".join(path))
        assert command.help and command.help.strip(), f"`tinyopt {' '.join(path)}` has no help text"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
    assert {"sweep", "data prepare", "data info"} <= set(names)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from tinyopt.cli import main; sys.argv = ['tinyopt', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'optuna', 'sklearn') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "tinyopt", "--version"], capture_output=True, text=True, check=True)
    assert "tinyopt" in out.stdout


def test_version_prints_the_name_and_the_installed_version():
    from importlib import metadata

    import tinyopt

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"tinyopt {metadata.version('tinyopt')}\n", result.output
    assert metadata.version("tinyopt") == tinyopt.__version__
