"""Errors that mean "the user's input is wrong" (CLI exit code 2), as opposed to bugs (exit code 1)."""


class TokzooError(Exception):
    """Bad config, bad input file, missing resource: one readable message naming the problem and the fix."""


class ConfigError(TokzooError, ValueError):
    """A config value is unknown, of the wrong type, or inconsistent with another one."""


class DataError(TokzooError):
    """A dataset is missing, empty or unreadable."""


class NonFiniteLossError(TokzooError):
    """Training produced a NaN/Inf loss: the variant stops, its last good checkpoint is kept."""
