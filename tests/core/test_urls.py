"""Storage and tracking URLs: secrets hidden, first lines of errors, the file of a sqlite URL."""

from __future__ import annotations

from pathlib import Path

from tinyopt.core.urls import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, first_line, redact, sqlite_path


def test_redact_hides_secrets():
    text = redact("postgresql+psycopg://bob:s3cr@t@db:5432/x and http://u:pw@h:5000/?token=abc&x=1")
    assert "s3cr" not in text and "pw@" not in text and "abc" not in text
    assert "bob:***@db:5432/x" in text and "token=***&x=1" in text


def test_redact_leaves_urls_without_secrets_alone():
    for text in ("sqlite:///studies/tinyopt.db", "http://127.0.0.1:5000/?x=1", "postgresql://bob@db/x"):
        assert redact(text) == text
    assert redact("https://h/?password=pw&api_key=k") == "https://h/?password=***&api_key=***"


def test_first_line_is_the_first_line_redacted_or_the_type_name():
    err = ValueError("cannot reach postgresql://bob:hunter2@db/x\nsecond line")
    assert first_line(err) == "cannot reach postgresql://bob:***@db/x"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("  \n ")) == "RuntimeError"


def test_sqlite_path_is_the_file_of_a_sqlite_url_only():
    assert sqlite_path(DEFAULT_STORAGE) == Path("studies/tinyopt.db")
    assert sqlite_path(DEFAULT_TRACKING_URI) == Path("mlruns/mlflow.db")
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    for url in ("postgresql+psycopg://db/x", "journal:studies/j.log", "http://127.0.0.1:5000", "sqlite:/x.db"):
        assert sqlite_path(url) is None
