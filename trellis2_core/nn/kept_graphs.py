"""CUDA graphs kept between sampling loops (issue 7): the store behind ``cuda_graphs.GraphedModel(keep=True)``.

Why: the SS flow's inputs have the same shapes in every generation, so its graphs can serve the next loop instead
of being captured again (each capture: one forward's launches on the host with the GPU idle, 80-170 ms per SS
stage on an H100, ``bench/bench_pipeline.py --trace``).

What: at the end of its loop a wrapper created with ``keep=True`` ``put``s its graphs here, keyed by the model
object (weakly: they die with it), when every captured key names shapes and values only (``reusable``: sparse
keys name their coordinates by identity, so they never match a later loop and nothing is kept). The next
``GraphedModel(model, keep=True)`` ``take``s them if the model's parameters and buffers are still the same tensors
(``fingerprint``: pointer, dtype, shape) as when they were captured; otherwise they are dropped.

Memory: kept graphs hold their pool (the SS flow's activations, ~0.3-0.4 GB at bf16) outside any model's weights.
``release_graphs(model)`` frees it, and whoever moves or drops the weights calls it: the engine's ``Components``
on offload/free/unload, the ComfyUI nodes' model patcher on detach and partial unload. The memory planner counts
it (``MemoryPlan.keep_graphs``).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch


class Kept:
    """Graphs one model's loop left for its next loop: their pool, and the weights they read (fingerprint)."""

    def __init__(self, weights: tuple, pool, entries: dict[tuple, Any]):
        self.weights, self.pool, self.entries = weights, pool, entries


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Kept (dies with the model)


def put(model: torch.nn.Module, weights: tuple, pool, entries: dict[tuple, Any]) -> bool:
    """Keep ``entries`` (captured against ``weights``) for ``model``'s next loop; False (nothing kept) when the
    weights have moved since."""
    if weights != fingerprint(model):
        return False
    _KEPT[model] = Kept(weights, pool, entries)
    return True


def take(model: Any) -> Kept | None:
    """The graphs kept for ``model``, removed from the store (one loop at a time owns them: their static inputs are
    shared), or None; graphs whose weights have moved are dropped."""
    try:
        kept = _KEPT.pop(model, None)
    except TypeError:  # not weakly referable: never kept
        return None
    return kept if kept is not None and kept.weights == fingerprint(model) else None


def release_graphs(model: Any) -> bool:
    """Free the CUDA graphs kept for ``model`` (and their memory, at the allocator's next empty_cache); call it
    before moving, replacing or dropping the model's weights. True when there were any. Any object may be passed."""
    try:
        return _KEPT.pop(model, None) is not None
    except TypeError:
        return False


def kept_graphs(model: Any) -> int:
    """How many graphs are kept for ``model``'s next loop."""
    try:
        kept = _KEPT.get(model)
    except TypeError:
        return 0
    return 0 if kept is None else len(kept.entries)


def fingerprint(model: Any) -> tuple | None:
    """Where the weights a graph reads live: (pointer, dtype, shape) of every parameter and buffer; None for a
    model that is not a torch module (its weights cannot be listed, so its graphs are never kept)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in itertools.chain(model.parameters(), model.buffers()))


def reusable(key: tuple) -> bool:
    """A ``GraphedModel`` key that can match a later loop's call: only shapes and values, no object by identity."""
    return all(sig[0] in ("T", "V") for sig in key[1:])
