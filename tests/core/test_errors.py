"""The exceptions tinyopt raises on purpose: which stop a sweep and which fail one trial."""

from __future__ import annotations

import pytest

from tinyopt.core import errors

FATAL = (errors.ConfigError, errors.DataError, errors.WeightsError, errors.StudyError)


@pytest.mark.parametrize("kind", [*FATAL, errors.TrialError])
def test_every_error_is_a_tinyopt_error_whose_message_is_its_text(kind):
    err = kind("space.epochs: got 0; expected an integer >= 1")
    assert isinstance(err, errors.TinyoptError) and isinstance(err, Exception)
    assert str(err) == "space.epochs: got 0; expected an integer >= 1"


@pytest.mark.parametrize("kind", FATAL)
def test_fatal_errors_are_no_trial_errors(kind):
    assert not issubclass(kind, errors.TrialError)


def test_a_trial_error_is_caught_as_a_tinyopt_error_but_no_other_kind():
    with pytest.raises(errors.TinyoptError):
        raise errors.TrialError("loss became NaN")
    assert not any(issubclass(errors.TrialError, kind) for kind in FATAL)
    assert not issubclass(errors.TinyoptError, errors.TrialError)
