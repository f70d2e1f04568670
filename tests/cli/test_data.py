"""``tinyopt data prepare`` and ``tinyopt data info`` through click, and the import cost of the data layer."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tinyopt.cli import cli
from tinyopt.cli import data as data_cli
from tinyopt.data import cache as data


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_prepare_then_info(tiny_folder, tmp_path):
    prepared = _run("data", "prepare", "--data", str(tiny_folder), "--cache", str(tmp_path),
                    "--selection-fraction", "0.2", "--seed", "3")
    assert prepared.exit_code == 0, prepared.output
    shown = _run("data", "info", "--cache", str(tmp_path))
    assert shown.exit_code == 0, shown.output
    summary = data.info(tmp_path)
    assert summary["splits"] == {"train": 120, "selection": 30, "test": 30}
    for text in ("classes", "5", "train images", "120", "selection images", "30", "bytes on disk",
                 summary["fingerprint"], "seed=3"):
        assert text in shown.output
    assert summary["fingerprint"] in prepared.output


def test_prepare_reads_the_cache_from_the_environment(tiny_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYOPT_CACHE", str(tmp_path))
    assert _run("data", "prepare", "--data", str(tiny_zip)).exit_code == 0
    assert data.info()["cache"] == str(tmp_path / "prepared")


@pytest.mark.parametrize(("args", "message"), [
    (["data", "prepare", "--data", "/no/such/tiny-imagenet-200.zip"], "data source /no/such/tiny-imagenet-200.zip"),
    (["data", "info"], "holds no prepared dataset; run `tinyopt data prepare"),
])
def test_bad_input_exits_non_zero_with_one_line(args, message, tmp_path):
    result = _run(*args, "--cache", str(tmp_path))
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1


def test_corrupt_image_names_the_file_and_skip_bad_counts_it(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "src")
    (folder / "val" / "images" / "val_1.JPEG").write_bytes(b"garbage")
    failed = _run("data", "prepare", "--data", str(folder), "--cache", str(tmp_path / "cache"))
    assert failed.exit_code == 1 and "val_1.JPEG cannot be decoded" in failed.stderr
    skipped = _run("data", "prepare", "--data", str(folder), "--cache", str(tmp_path / "cache"), "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert data.info(tmp_path / "cache")["skipped"] == 1


def test_selection_fraction_is_validated_by_the_cli(tmp_path):
    result = _run("data", "prepare", "--selection-fraction", "1.5", "--cache", str(tmp_path))
    assert result.exit_code == 2 and "selection-fraction" in result.output


def test_every_data_command_has_help():
    assert data_cli.data.help
    for name, command in data_cli.data.commands.items():
        assert command.help, name
        result = _run("data", name, "--help")
        assert result.exit_code == 0 and "--cache" in result.output


def test_the_data_layer_imports_no_tensorflow():
    code = "import sys, tinyopt.data.cache, tinyopt.cli.data; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
