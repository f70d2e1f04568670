"""How a damaged file tinyopt reads back is reported: one line naming the file, what is wrong and the fix."""

from __future__ import annotations

import zipfile

import pytest

from tinyopt.core.damage import MLFLOW_FIX, damage_message

FIX = "export the bundle again"


def _whole_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"data")


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.mkdir(), "it is a folder, not a file"),
    (lambda p: None, "it does not exist"),
    (lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
    (lambda p: p.write_bytes(b"PK\x03\x04 cut short"), "it is not a whole zip archive (truncated or overwritten)"),
    (_whole_zip, "its content cannot be read (ValueError: bad member)"),
])
def test_the_message_says_what_the_file_is(tmp_path, make, problem):
    path = tmp_path / "model.keras"
    make(path)
    message = damage_message(f"the bundle's {path}", path, ValueError("bad member\nmore"), FIX)
    assert message == f"the bundle's {path} is damaged: {problem}; {FIX}"
    assert "\n" not in message


def test_the_loaders_error_is_named_without_its_secrets(tmp_path):
    path = tmp_path / "predictions.npz"
    _whole_zip(path)
    err = OSError("cannot fetch http://u:pw@mlflow.example.com/x")
    message = damage_message("predictions.npz of MLflow run r1", path, err, MLFLOW_FIX)
    assert "(OSError: cannot fetch http://u:***@mlflow.example.com/x)" in message and "pw" not in message
    assert message.endswith(f"; {MLFLOW_FIX}")
