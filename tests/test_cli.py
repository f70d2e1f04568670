"""The command line: help everywhere, fast help, errors as one line and a non-zero exit code."""

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
