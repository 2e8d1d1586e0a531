"""Errors a user can cause. Each carries a message that names the file and says what to do."""


class VopError(Exception):
    """Base class of user-facing errors: the CLI prints the message, never a traceback."""


class CheckpointError(VopError):
    """A weights or prompt file that is missing, unreadable, or does not fit the model."""


class ConfigError(VopError):
    """An invalid configuration (unknown key, wrong type, bad value)."""


class DataError(VopError):
    """A missing or malformed annotation file, or an unusable video."""


class MissingDependencyError(VopError, ImportError):
    """An optional package that a feature needs is not installed (or cannot be imported). The message
    names the package and the pip command that installs it; ``import vop`` and the models never need it."""
