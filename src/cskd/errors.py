"""Every error a user can fix, in one place: the CLI turns each into one line and exit status 2."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """Weights or teacher outputs became NaN or infinite during training; the message names
    the step, what is not finite and which checkpoint holds the run."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite; the message names the step and the loss parts."""


class TeacherError(ValueError):
    """The teacher cannot give the dense responses CSKD needs."""


class GridError(ValueError):
    """The student's patch grid cannot be aligned to the teacher's feature grid."""


class CheckpointError(RuntimeError):
    """A weights or checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree; the message names the ranks involved."""


class DataError(ValueError):
    """A dataset or transform cannot be built or read; the message names the path and the fix."""


class ResourceError(RuntimeError):
    """The machine ran out of something the run needs (memory, disk space) or refused a write."""


class CacheError(DataError):
    """A teacher cache is missing, damaged, or was made for another teacher or data; the message
    names the file or the key that differs and how to rebuild it."""


# the errors a user can fix: the command prints them as one line and exits 2
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    TeacherError,
    GridError,
    NonFiniteError,
    DistributedError,
    ResourceError,
)
