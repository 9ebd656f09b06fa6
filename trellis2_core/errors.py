"""Exceptions the engine raises for bad input. Each message names what was expected, what came, and the fix."""

from __future__ import annotations

from typing import Callable


class Trellis2Error(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(Trellis2Error, ValueError):
    """A model or pipeline config is malformed (unknown or missing keys, broken invariants)."""


class CheckpointError(Trellis2Error):
    """A checkpoint file is missing, corrupt, or does not match the model it should load into."""


class InputError(Trellis2Error, ValueError):
    """A user input (image, mask, mesh, parameter) cannot be processed."""


class Interrupted(Trellis2Error):
    """The caller asked the engine to stop (cancel); raised between steps, leaving no partial state behind."""


def stop_if_asked(should_stop: Callable[[], bool] | None, where: str) -> None:
    """Raise ``Interrupted(where)`` when ``should_stop`` is given and returns True (the caller asked to cancel)."""
    if should_stop is not None and should_stop():
        raise Interrupted(where)
