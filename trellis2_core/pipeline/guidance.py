"""Runs one flow model through the sampler with the pipeline's conditioning conventions.

The negative condition is all-zero tokens of the condition's shape (SPEC 13.4). Guided steps evaluate the
condition and the negative condition as one batch of two by default: every TRELLIS.2 flow treats batch items
independently (sparse attention is per item), so this is exact and halves the number of model launches;
pass ``batched_cfg=False`` to trade that speed for the memory of one item.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..sampling import SamplerParams, sample
from ..sparse import SparseTensor


def run_sampler(
    model: torch.nn.Module,
    noise: torch.Tensor | SparseTensor,
    cond: torch.Tensor,
    params: SamplerParams,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    batched_cfg: bool = True,
    **model_kwargs: Any,
) -> torch.Tensor | SparseTensor:
    """The sample at t = 0 for ``noise`` (dense [1, ...] or a SparseTensor of one item) under ``cond`` [1, L, C]."""
    cond = cond.to(noise.device)
    result = sample(
        model,
        noise,
        cond,
        torch.zeros_like(cond),
        params,
        progress=progress,
        should_stop=should_stop,
        extra_kwargs=model_kwargs,
        batched_cfg=batched_cfg,
    )
    return result.samples
