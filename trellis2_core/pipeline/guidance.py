"""Runs one flow model through the sampler with the pipeline's conditioning conventions.

The negative condition is all-zero tokens of the condition's shape (SPEC 13.4). Guided steps evaluate the
condition and the negative condition as one batch of two by default: every TRELLIS.2 flow treats batch items
independently (sparse attention is per item), so this is exact and halves the number of model launches;
pass ``batched_cfg=False`` to trade that speed for the memory of one item. Models that declare
``accepts_zero_cond_from`` (the TRELLIS.2 flows) are told which items carry the zero condition and skip their
cross-attention (``nn/attention.py``, ``CrossAttention``).

A condition of V > 1 views ([V, L, C]) goes through ``multiview.prepare`` (see multiview.py for the modes);
V = 1 takes the single-view path unchanged.

On CUDA the model runs through ``nn.cuda_graphs.GraphedModel`` for the length of the loop (``cuda_graphs=True``,
the default): same-shape calls after the first replay a captured graph where that pays, which removes the host's
launch overhead at small token counts (results unchanged; ``TRELLIS2_CUDA_GRAPHS=0`` turns it off). It is told how
many calls of each batch size the schedule makes (``_calls_per_batch``). With ``keep_graphs`` (the SS stage, whose
shapes never change) the graphs stay with the model for the next generation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..sampling import SamplerParams, sample
from ..errors import InputError
from ..nn.cuda_graphs import GraphedModel
from ..sparse import SparseTensor, batch_items
from . import multiview


def run_sampler(
    model: torch.nn.Module,
    noise: torch.Tensor | SparseTensor,
    cond: torch.Tensor,
    params: SamplerParams,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    batched_cfg: bool = True,
    multiview_mode: str = "concat",
    cuda_graphs: bool = True,
    keep_graphs: bool = False,
    **model_kwargs: Any,
) -> torch.Tensor | SparseTensor:
    """The sample at t = 0 for ``noise`` (dense [1, ...] or a SparseTensor of one item) under ``cond`` [V, L, C].

    V = 1: one image (the reference's path). V > 1: views combined per ``multiview_mode`` (multiview.py).
    keep_graphs: keep this loop's CUDA graphs with the model for the next loop (``GraphedModel(keep=True)``; the
    caller releases them when it moves the model's weights).
    """
    if not torch.is_tensor(cond) or cond.dim() != 3 or cond.shape[0] < 1:
        got = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
        raise InputError(f"cond must be DINOv3 tokens [V, L, C] (V views, usually 1); got {got}")
    multiview.check_mode(multiview_mode)
    cond = cond.to(noise.device)
    neg_cond = torch.zeros_like(cond)
    calls = _calls_per_batch(params, batch_items(noise), batched_cfg, cond.shape[0] if multiview_mode == "average" else 1)
    # the multi-view wrapper calls the graphed model
    with GraphedModel(model, enabled=cuda_graphs, expected_calls=calls, keep=keep_graphs) as graphed:
        model_fn = graphed
        if cond.shape[0] > 1:
            model_fn, cond, neg_cond, progress, batched_cfg = multiview.prepare(
                graphed, cond, multiview_mode, progress, batched_cfg
            )
        result = sample(
            model_fn,
            noise,
            cond,
            neg_cond,
            params,
            progress=progress,
            should_stop=should_stop,
            extra_kwargs=model_kwargs,
            batched_cfg=batched_cfg,
            zero_neg_cond=bool(getattr(model, "accepts_zero_cond_from", False)),
        )
    return result.samples


def _calls_per_batch(params: SamplerParams, batch: int, batched_cfg: bool, views: int) -> dict[int, int]:
    """{batch size: model calls} the sampler will make (``views``: calls per evaluation, multi-view "average")."""
    guided = params.guided_steps()
    if not batched_cfg or params.guidance_strength == 0 or views > 1:  # "average" never batches the pair
        return {batch: params.model_calls() * views}
    return {batch: params.steps - guided, 2 * batch: guided}
