"""The options several commands share: one definition, the same names, defaults and help in every command."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tinyopt.cli import cli
from tinyopt.cli.options import cache_option, data_option, storage_options, tracking_option
from tinyopt.core.urls import DEFAULT_STORAGE, DEFAULT_TRACKING_URI


@click.command()
@data_option
@cache_option
@storage_options
def _echo(**values):
    click.echo(repr(sorted(values.items())))


def _options_line(command: list[str], option: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.strip().startswith(f"{option} ")]
    return line


def test_defaults_reach_the_command_under_their_parameter_names():
    result = CliRunner().invoke(_echo, [])
    assert result.exit_code == 0, result.output
    assert result.output == repr([("cache_dir", None), ("source", None), ("storage", DEFAULT_STORAGE),
                                  ("tracking_uri", DEFAULT_TRACKING_URI)]) + "\n"


def test_given_values_reach_the_command(tmp_path):
    args = ["--data", "tiny.zip", "--cache", str(tmp_path), "--storage", "journal:j.log", "--tracking-uri",
            "http://127.0.0.1:5000"]
    result = CliRunner().invoke(_echo, args)
    assert result.exit_code == 0, result.output
    assert result.output == repr([("cache_dir", str(tmp_path)), ("source", "tiny.zip"), ("storage", "journal:j.log"),
                                  ("tracking_uri", "http://127.0.0.1:5000")]) + "\n"


def test_cache_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(_echo, ["--cache", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file" in result.output


def test_tracking_option_alone_adds_no_storage():
    command = tracking_option(click.command()(lambda **values: click.echo(sorted(values))))
    assert [param.name for param in command.params] == ["tracking_uri"]


@pytest.mark.parametrize("command", [["sweep"], ["best"], ["report"], ["ui"]])
def test_store_options_show_their_defaults_in_every_command(command):
    assert f"[default: {DEFAULT_STORAGE}]" in _options_line(command, "--storage")
    assert f"[default: {DEFAULT_TRACKING_URI}]" in _options_line(command, "--tracking-uri")


@pytest.mark.parametrize("command", [["sweep"], ["best"], ["data", "prepare"]])
def test_data_options_read_alike_in_every_command(command):
    assert "Tiny ImageNet source: the official URL (default)" in _options_line(command, "--data")
    assert "Dataset cache folder (default: $TINYOPT_CACHE or ~/.cache/tinyopt)." in _options_line(command, "--cache")
