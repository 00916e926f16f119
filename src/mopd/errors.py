"""Exception hierarchy.

    MopdError
     +-- ConfigError        invalid settings; start-up stops with the message
     +-- InvalidRow         one input row failed validation (carries a reason code)
     +-- AlignmentError     a backend response breaks a token alignment rule
     +-- BackendError       a backend call failed after its retry policy
     |    +-- TeacherError
     +-- StageError         a pipeline stage crashed; the service stops
"""

from __future__ import annotations


class MopdError(Exception):
    """Base class of every error raised by mopd."""


class ConfigError(MopdError):
    """Settings are invalid; the message names the variable and the fix."""


class InvalidRow(MopdError):
    """An input row is rejected.

    :param reason: a short snake_case reason code, used as a metric label and
        written to the rejects file.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AlignmentError(MopdError):
    """A response does not line up with the token ids that were sent."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BackendError(MopdError):
    """A backend call failed after its retry policy ran out."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TeacherError(BackendError):
    """A teacher could not score a group."""


class StageError(MopdError):
    """A pipeline stage crashed."""
