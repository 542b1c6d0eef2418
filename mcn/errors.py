"""The exceptions the entrypoints turn into a one-line message (no traceback)."""


class MCNError(Exception):
    """Bad input or a fault a user can fix: the message names the bad value or path and the fix."""

    exit_status = 2


class ConfigError(MCNError):
    pass


class CheckpointError(MCNError):
    pass


class DataError(MCNError):
    pass


class FileError(MCNError):
    """A record mcn reads (results JSON, run status, a report CSV) is unreadable, truncated or not what its name
    says; the message names the file and how to replace it. Checkpoints have CheckpointError."""


class StorageError(MCNError):
    """A file could not be written (full disk, read-only folder); nothing half-written is left behind."""

    exit_status = 1


class TrainingDiverged(MCNError):
    """The loss stopped being a finite number."""

    exit_status = 1


class RunInterrupted(MCNError):
    """Ctrl-C: the run stopped at a step boundary; its last finished epoch is on disk."""

    exit_status = 130
