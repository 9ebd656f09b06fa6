"""The engine's progress and cancellation hooks, adapted to ComfyUI.

The engine takes ``progress(done, total)`` and ``should_stop()`` callables and raises ``Interrupted`` when
``should_stop`` turns true between two sampler steps. ComfyUI has a per-node ``ProgressBar`` and a global
interrupt flag that ``/interrupt`` (the Cancel button) sets; its executor treats ``InterruptProcessingException``
as a cancel (not an error) and clears the flag, so the next prompt runs normally.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import comfy.model_management as mm
import comfy.utils

from ..trellis2_core.errors import Interrupted


def progress_bar() -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that drives this node's ComfyUI progress bar (created on the first report)."""
    bar: list[comfy.utils.ProgressBar] = []

    def report(done: int, total: int) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return report


def should_stop() -> bool:
    """True once the user pressed Cancel (ComfyUI's interrupt flag); polled by the engine between steps."""
    return mm.processing_interrupted()


@contextlib.contextmanager
def cancellable() -> Iterator[None]:
    """Turn the engine's ``Interrupted`` into ComfyUI's ``InterruptProcessingException`` (a cancel, not an error)."""
    try:
        yield
    except Interrupted as e:
        mm.throw_exception_if_processing_interrupted()  # clears the flag and raises when it is set
        raise mm.InterruptProcessingException() from e


__all__ = ["cancellable", "progress_bar", "should_stop"]
