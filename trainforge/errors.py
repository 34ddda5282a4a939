"""The project's exception types: one per area, each caught at the CLI boundary and printed as one line."""


class TrainforgeError(Exception):
    """Base of every error a user can cause and fix; the CLI prints it without a traceback."""

    exit_status = 2


class DataError(TrainforgeError):
    """A data set is missing, unreadable or malformed."""


class ConfigError(TrainforgeError):
    """A configuration value or file is invalid."""


class ModelError(TrainforgeError):
    """A model name, architecture or set of weights does not fit."""


class CheckpointError(TrainforgeError):
    """A run directory, checkpoint or weights file is missing, corrupt or unsafe."""


class TrainingError(TrainforgeError):
    """Training cannot continue (non-finite loss, failed checkpoint write, ...)."""


class DeployError(TrainforgeError):
    """A model cannot be compressed, exported or served as asked (or an exported copy disagrees with it)."""


_announced: set[str] = set()


def deprecated(message: str) -> None:
    """Prints one line on stderr about an old name or format that still works, once per process and message."""
    import sys

    if message not in _announced:
        _announced.add(message)
        print(f"trainforge: deprecated: {message}", file=sys.stderr)
