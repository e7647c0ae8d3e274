"""Errors a user can fix: the CLI prints their message and exits non-zero, without a traceback."""


class TrainingError(Exception):
    """Base class for problems with the user's input or environment."""


class DataError(TrainingError):
    """The IMDb source is missing, unreadable, corrupt or fails its checksum."""


class VectorsError(TrainingError):
    """Word vectors cannot be loaded or do not fit the configuration."""


class ConfigError(TrainingError):
    """A hyper-parameter or option is out of range."""


class ExportError(TrainingError):
    """The exported bundle does not reproduce the trained model."""
