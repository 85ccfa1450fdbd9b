"""Errors that stop a run with one readable message instead of a traceback.

The entry points (`train.py`, `eval.py`) print ``str(error)`` of any :class:`AnomalyLabError` and exit
with status 1, so every message must name the path or option at fault and say what was expected.
"""


class AnomalyLabError(Exception):
    """Base of every error meant for the user, not for a developer."""


class DataError(AnomalyLabError):
    """A dataset folder, image or mask is missing or not in the expected layout."""


class ConfigError(AnomalyLabError):
    """An option has a value the code cannot use."""


class WeightsUnavailableError(AnomalyLabError):
    """Pretrained weights were asked for but cannot be downloaded and are not cached."""
