"""The project's error types: every user-facing failure says what is wrong and how to fix it."""


class MetalearnError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ConfigError(MetalearnError):
    """A config value is unknown, of the wrong type or impossible."""


class DataError(MetalearnError):
    """A data set is missing, truncated or corrupt, or cannot hold the requested tasks."""


class CheckpointError(MetalearnError):
    """A checkpoint is unreadable or belongs to a different model or algorithm."""


class TrainingError(MetalearnError):
    """Training diverged (NaN or infinite loss)."""
