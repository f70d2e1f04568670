"""The exceptions tinyopt raises on purpose.

Two kinds matter to the runner: a ``TrialError`` means "this trial is bad, record it as FAIL and
go on"; any other ``TinyoptError`` means "the sweep cannot go on, stop with this message". Every
message is one line that says what was received and how to fix it.
"""


class TinyoptError(Exception):
    """A user-facing, fatal error; ``str(err)`` is the whole message."""


class ConfigError(TinyoptError):
    """A config file, ``--set`` override or search space is malformed."""


class DataError(TinyoptError):
    """The dataset source or cache is missing, corrupt or inconsistent."""


class WeightsError(TinyoptError):
    """Pretrained weights cannot be obtained or do not fit the model."""


class StudyError(TinyoptError):
    """A study, storage or tracking store is missing or unusable."""


class TrialError(TinyoptError):
    """This trial cannot succeed (invalid combination, NaN loss); the sweep goes on."""
