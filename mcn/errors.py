"""The one exception type the entrypoints turn into a one-line message (no traceback)."""


class MCNError(Exception):
    """Bad input a user can fix: the message names the bad value and the fix."""


class ConfigError(MCNError):
    pass


class CheckpointError(MCNError):
    pass


class DataError(MCNError):
    pass
