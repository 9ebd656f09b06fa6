"""Multi-view conditioning: several images of one object condition one generation, with no new weights.

TRELLIS.2 is trained on ONE image per object and the reference exposes no multi-view mode. Every flow model
sees the image only through cross-attention to its DINOv3 tokens, so views can be combined at sampling time.
A ``Conditioning`` with V > 1 views holds tokens [V, L, C] per resolution; the sampler then calls the model
through ``MultiViewVelocity`` with the condition as [B, V, L, C] (B = 1, or 2 for batched guidance). Modes:

``"concat"`` (default): the tokens of all views are concatenated along the token axis into one context of
    V * L tokens, every step. Well defined: the cross-attention's q/k RMSNorm and its pre-norm act per token,
    so each view's keys are exactly what that view alone would give; softmax then spreads each voxel's
    attention over all views, so each voxel draws from the views whose features match it best.
    Cost: the same number of model calls as one view; cross-attention work and key/value memory grow V-fold
    (at 1024 with 8 views: 32 808 context tokens). The negative condition is zeros of the same V * L tokens
    (all-zero tokens give identical keys, so its output equals the single-view negative's).
``"average"``: one model call per view each step; the velocities are averaged ("multidiffusion", like TRELLIS
    v1's multi-image mode of that name). The negative velocity of a guided step is computed once (it does not
    depend on the views). Cost: V model calls per step (+1 on guided steps): about V times one view's time.
    Memory of one view. Views that disagree are blended, which tends to smooth detail.
``"alternate"``: step k is conditioned on view k mod V alone (TRELLIS v1's "stochastic" mode, which is in
    fact this deterministic cycle). Cost and memory of one view. Each view steers only about steps / V steps
    and the early, coarse steps go to the first views: put the most informative view (usually the front)
    first, and use at least V steps. Each flow (structure, shape, cascade HR shape, texture) restarts at view 0.

Common limits: the model receives no camera poses, so it cannot know where a view looks from; the views must
show the same object, each cropped and centred by preprocessing (scale/lighting mismatches are blended, not
reconciled). Multi-view sharpens what the views agree on; it is no substitute for a multi-view-trained model.
The random stream does not depend on the number of views (same seed, same noise), and V = 1 takes exactly the
single-view code path in every mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InputError
from ..sparse import SparseTensor

MULTIVIEW_MODES = ("concat", "average", "alternate")


def check_mode(mode: Any) -> str:
    """``mode`` if it is one of ``MULTIVIEW_MODES``, else an InputError naming them."""
    if mode not in MULTIVIEW_MODES:
        raise InputError(
            f"multiview_mode must be one of {list(MULTIVIEW_MODES)}; got {mode!r}. 'concat' is the default "
            "(one context of all views' tokens), 'average' averages per-view predictions, 'alternate' cycles views per step"
        )
    return mode


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Per-view tokens [1, L, C] (or [L, C]) of one resolution -> [V, L, C]; every view must have the same L and C."""
    if not views:
        raise InputError("images: got an empty list; pass at least one image")
    rows = [v.unsqueeze(0) if v.dim() == 2 else v for v in views]
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) != 1 or any(r.dim() != 3 or r.shape[0] != 1 for r in rows):
        raise InputError(f"views: every view must have tokens [1, L, C] of one shape; got {[tuple(r.shape) for r in rows]}")
    return torch.cat(rows, dim=0)


class MultiViewVelocity:
    """A velocity ``model_fn`` for ``sampling.sample`` whose condition is per batch item a set of views.

    Called as ``self(x, t, cond, **kwargs)`` with cond [B, V, L, C]: batch item b of x is conditioned on
    the V views ``cond[b]`` according to ``mode`` (module docstring). ``step`` is the index of the sampler
    step being evaluated (the sampler's progress callback advances it: see ``step_hook``); only
    ``"alternate"`` uses it. The wrapped model is called with ordinary [B, L', C] conditions.
    """

    def __init__(self, model: Callable[..., Any], mode: str):
        self.model = model
        self.mode = check_mode(mode)
        self.step = 0

    def step_hook(self, progress: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """A progress callback that records the finished step count, then forwards to ``progress``."""

        def hook(done: int, total: int) -> None:
            self.step = done
            if progress is not None:
                progress(done, total)

        return hook

    def __call__(self, x: torch.Tensor | SparseTensor, t: torch.Tensor, cond: torch.Tensor, **kwargs: Any):
        if not torch.is_tensor(cond) or cond.dim() != 4:
            got = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            raise InputError(f"multi-view cond must be [B, V, L, C] (views per batch item); got {got}")
        views = cond.shape[1]
        if self.mode == "concat" or views == 1:
            return self.model(x, t, cond.flatten(1, 2), **kwargs)
        if self.mode == "alternate":
            return self.model(x, t, cond[:, self.step % views], **kwargs)
        preds = [self.model(x, t, cond[:, k], **kwargs) for k in range(views)]  # "average": one call per view
        if isinstance(preds[0], SparseTensor):
            return preds[0].replace(torch.stack([p.feats for p in preds]).mean(0))
        return torch.stack(preds).mean(0)


def prepare(model: Callable[..., Any], cond: torch.Tensor, mode: str, progress, batched_cfg: bool):
    """Sampler inputs for views ``cond`` [V, L, C], V > 1: (model_fn, cond, neg_cond, progress, batched_cfg).

    cond becomes [1, V, L, C]. The negative condition is zeros: [1, V, L, C] for "concat"/"alternate" (so
    cond and uncond can still be batched), a single view [1, 1, L, C] for "average" (evaluated once, so
    batching is turned off: a batched pair would repeat the negative V times).
    """
    wrapper = MultiViewVelocity(model, mode)
    views = cond.unsqueeze(0)
    if wrapper.mode == "average":
        return wrapper, views, torch.zeros_like(views[:, :1]), wrapper.step_hook(progress), False
    return wrapper, views, torch.zeros_like(views), wrapper.step_hook(progress), batched_cfg
