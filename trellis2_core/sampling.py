"""Rectified-flow Euler sampler with classifier-free guidance, guidance interval and guidance rescale (SPEC.md 11).

The reference's ``FlowEulerGuidanceIntervalSampler``, as one function over a velocity model:

* forward process ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``; the model predicts
  ``v = (1 - sigma_min) eps - x0`` and is called as ``model_fn(x, 1000 * t, cond, **extra)``;
* time grid ``numpy.linspace(1, 0, steps + 1)`` warped by ``s t / (1 + (s - 1) t)``, all float64 (see ``time_grid``);
* Euler update ``x <- x - (t - t_prev) v``.

``x`` is a dense tensor [B, ...] or a ``SparseTensor`` (feats [N, C], batch in coords[:, 0]); the velocity model returns the
same type. Sparse results are made with ``noise.replace(feats)``, so they share the noise's coordinate cache (the texturing
path relies on the encoder's subdivision tables travelling with the latent, SPEC 16).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import numpy as np
import torch

from .errors import ConfigError, InputError, stop_if_asked
from .sparse import SparseTensor, batch_items

__all__ = ["time_grid", "SamplerParams", "SampleResult", "sample"]

logger = logging.getLogger(__name__)

Latent = Union[torch.Tensor, SparseTensor]
SAMPLER_NAME = "FlowEulerGuidanceIntervalSampler"


def time_grid(steps: int, rescale_t: float) -> list[float]:
    """The ``steps + 1`` times from 1 to 0, as Python floats (float64).

    numpy's linspace on purpose: torch.linspace in float64 differs by 1 ulp at some points (0.30000000000000004 vs
    0.29999999999999993 for 10 steps), which moves a step across an inclusive guidance-interval bound.
    """
    ts = np.linspace(1, 0, steps + 1)
    ts = rescale_t * ts / (1 + (rescale_t - 1) * ts)
    return ts.tolist()


@dataclasses.dataclass(frozen=True)
class SamplerParams:
    """Sampler settings of one stage (the ``params`` of a pipeline.json sampler entry, plus ``sigma_min`` from ``args``).

    guidance_strength g: ``v = g v_cond + (1 - g) v_uncond``; 1 disables guidance, 0 uses only the negative condition.
    guidance_rescale r in [0, 1]: blend of the std-rescaled and plain guided x0 prediction (0 = off).
    guidance_interval (lo, hi): guidance applies at steps whose float64 t satisfies ``lo <= t <= hi``.
    rescale_t s > 0: time-grid warp (s > 1 spends more steps near t = 1).
    """

    steps: int
    guidance_strength: float = 1.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0
    sigma_min: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sampler steps must be an int >= 1; got {self.steps!r}. The official value is 12.")
        for name in ("guidance_strength", "guidance_rescale", "rescale_t", "sigma_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"sampler {name} must be a finite number; got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"sampler guidance_rescale must be in [0, 1]; got {self.guidance_rescale}. Use 0 to disable it.")
        if self.rescale_t <= 0:
            raise ConfigError(f"sampler rescale_t must be > 0; got {self.rescale_t}. Use 1.0 for a uniform time grid.")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"sampler sigma_min must be in [0, 1); got {self.sigma_min}. The official value is 1e-5.")
        iv = self.guidance_interval
        try:
            lo, hi = (float(v) for v in iv)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sampler guidance_interval must be two numbers (lo, hi); got {iv!r}, e.g. (0.6, 1.0)") from e
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConfigError(f"sampler guidance_interval must satisfy lo <= hi; got {iv!r}, e.g. (0.6, 1.0)")
        object.__setattr__(self, "guidance_interval", (lo, hi))

    @classmethod
    def from_pipeline_entry(cls, entry: Mapping[str, Any], **overrides: Any) -> SamplerParams:
        """From a pipeline.json sampler entry ``{"name", "args": {"sigma_min"}, "params": {...}}``; ``overrides`` win."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"sampler entry must be a dict with 'name', 'args', 'params'; got {type(entry).__name__}")
        name = entry.get("name")
        if name != SAMPLER_NAME:
            raise ConfigError(f"sampler name must be {SAMPLER_NAME!r} (the only sampler TRELLIS.2 uses); got {name!r}")
        unknown = sorted(set(entry) - {"name", "args", "params"})
        args, params = dict(entry.get("args") or {}), dict(entry.get("params") or {})
        unknown += [f"args.{k}" for k in sorted(set(args) - {"sigma_min"})]
        fields = {f.name for f in dataclasses.fields(cls)} - {"sigma_min"}
        unknown += [f"params.{k}" for k in sorted(set(params) - fields)]
        unknown += [k for k in sorted(set(overrides) - fields - {"sigma_min"})]
        if unknown:
            raise ConfigError(f"sampler entry has unknown keys {unknown}; known: args.sigma_min, params.{sorted(fields)}")
        if "steps" not in params and "steps" not in overrides:
            raise ConfigError("sampler entry has no params.steps; pass steps=... or fix the pipeline.json entry")
        return cls(**{**args, **params, **overrides})

    def guided(self, t: float) -> bool:
        """Whether the step at float64 time ``t`` evaluates the negative condition (CFG or g == 0)."""
        lo, hi = self.guidance_interval
        return self.guidance_strength != 1 and lo <= t <= hi

    def guided_steps(self) -> int:
        """Steps that evaluate the negative condition (official: SS 10, shape 9, tex 0)."""
        return sum(self.guided(t) for t in time_grid(self.steps, self.rescale_t)[:-1])

    def model_calls(self) -> int:
        """Model evaluations ``sample`` makes without batched CFG (official: SS 22, shape 21, tex 12)."""
        return self.steps + (self.guided_steps() if self.guidance_strength != 0 else 0)


@dataclasses.dataclass
class SampleResult:
    """``samples``: x after the last step (type of the noise). ``t_seq``: the steps + 1 float64 times.
    ``pred_x_t`` / ``pred_x_0``: per step, x after the step and the x0 prediction (only with ``return_trajectory``).
    ``model_calls``: number of ``model_fn`` invocations (a batched cond+uncond pass counts once)."""

    samples: Latent
    t_seq: list[float]
    model_calls: int
    pred_x_t: list[Latent] | None = None
    pred_x_0: list[Latent] | None = None


def sample(
    model_fn: Callable[..., Latent],
    noise: Latent,
    cond: Any,
    neg_cond: Any,
    params: SamplerParams,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_kwargs: Mapping[str, Any] | None = None,
    batched_cfg: bool = False,
    zero_neg_cond: bool = False,
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate the flow from ``noise`` (t = 1) to a sample (t = 0) with ``params.steps`` Euler steps.

    Args:
        model_fn: ``model_fn(x, t, cond, **extra_kwargs) -> v`` with ``t`` float32 [B] = 1000 * t per batch item and
            ``v`` of x's type and shape. Called under ``torch.no_grad()``.
        noise: x at t = 1: dense [B, ...] float, or SparseTensor (the result keeps its coords and cache).
        cond / neg_cond: conditions passed through to the model; neg_cond (the pipeline uses ``zeros_like(cond)``) is
            only needed for guided steps and may be None otherwise.
        params: SamplerParams of the stage.
        progress: called as ``progress(done, total)`` after every step.
        should_stop: polled before every step; True raises ``Interrupted`` before any further model call.
        extra_kwargs: more model kwargs, identical for cond and uncond (e.g. ``concat_cond`` of the texture stage).
        batched_cfg: run cond and uncond as ONE model call on a batch of 2B: x, cond/neg_cond and tensor-valued
            extra_kwargs (Tensor or SparseTensor, taken to be per batch item) are concatenated along the batch (sparse:
            the second copy's batch indices shifted by B). Only valid for models whose items are independent (every
            TRELLIS.2 flow model: sparse attention is per item); needs cond and neg_cond as tensors of equal shape.
        zero_neg_cond: neg_cond is all zeros and model_fn takes ``zero_cond_from=k`` ("batch items k.. have an
            all-zero condition"; the TRELLIS.2 flow models then skip their cross-attention, whose output for a
            zero condition is one constant vector): passed on every call that evaluates neg_cond.
        return_trajectory: also keep x and the x0 prediction after every step (costs memory; off by default).
    """
    if not isinstance(params, SamplerParams):
        raise InputError(f"params must be a SamplerParams; got {type(params).__name__}. Use SamplerParams.from_pipeline_entry(...).")
    if not isinstance(noise, (torch.Tensor, SparseTensor)) or not noise.dtype.is_floating_point:
        raise InputError(f"noise must be a float torch.Tensor or SparseTensor; got {type(noise).__name__}")
    t_seq = time_grid(params.steps, params.rescale_t)
    needs_neg = any(params.guided(t) for t in t_seq[:-1])
    if needs_neg and neg_cond is None:
        raise InputError("neg_cond is None but guidance is active for some steps; pass zeros_like(cond) as the pipeline does")
    if batched_cfg and needs_neg and params.guidance_strength != 0:
        if not (isinstance(cond, torch.Tensor) and isinstance(neg_cond, torch.Tensor) and cond.shape == neg_cond.shape):
            raise InputError(
                "batched_cfg needs cond and neg_cond as tensors of one shape (they are concatenated along the batch); "
                f"got {_describe(cond)} and {_describe(neg_cond)}. Pass batched_cfg=False."
            )
    runner = _ModelRunner(model_fn, dict(extra_kwargs or {}), batched_cfg, zero_neg_cond)
    s = params.sigma_min
    x = noise
    traj_x: list[Latent] | None = [] if return_trajectory else None
    traj_x0: list[Latent] | None = [] if return_trajectory else None
    with torch.no_grad():
        for k in range(params.steps):
            stop_if_asked(should_stop, f"sampling interrupted before step {k + 1}/{params.steps}")
            t, t_prev = t_seq[k], t_seq[k + 1]
            v = _velocity(runner, x, t, cond, neg_cond, params)
            xf = _feats(x)
            if traj_x0 is not None:
                traj_x0.append(_like(x, (1 - s) * xf - (s + (1 - s) * t) * v))
            x = _like(x, xf - (t - t_prev) * v)
            if traj_x is not None:
                traj_x.append(x)
            if progress is not None:
                progress(k + 1, params.steps)
    logger.debug("sampled %d steps with %d model calls (batched_cfg=%s)", params.steps, runner.calls, batched_cfg)
    return SampleResult(samples=x, t_seq=t_seq, model_calls=runner.calls, pred_x_t=traj_x, pred_x_0=traj_x0)


def _velocity(runner: _ModelRunner, x: Latent, t: float, cond, neg_cond, params: SamplerParams) -> torch.Tensor:
    """Guided velocity at float64 time t, as a dense tensor (sparse: feats [N, C])."""
    g = params.guidance_strength
    if not params.guided(t):
        return runner.single(x, t, cond)
    if g == 0:  # the reference's explicit branch: negative condition only, no rescale
        return runner.single(x, t, neg_cond, negative=True)
    v_pos, v_neg = runner.pair(x, t, cond, neg_cond)
    v = g * v_pos + (1 - g) * v_neg
    r = params.guidance_rescale
    if r > 0:
        s = params.sigma_min
        xf = _feats(x)
        sigma_t = s + (1 - s) * t
        x0_pos = (1 - s) * xf - sigma_t * v_pos
        x0_cfg = (1 - s) * xf - sigma_t * v
        ratio = _item_std(x, x0_pos) / _item_std(x, x0_cfg)
        x0 = r * (x0_cfg * ratio) + (1 - r) * x0_cfg
        v = ((1 - s) * xf - x0) / sigma_t
    return v


def _item_std(x: Latent, values: torch.Tensor) -> torch.Tensor:
    """Std of each batch item over all its other elements, broadcastable against ``values``.

    Dense: torch.std (unbiased), [B, 1, ...]. Sparse: sqrt(E[v^2] - E[v]^2) over the item's voxels x channels (biased,
    as the reference's SparseTensor.std), gathered back to [N, 1]. Only the ratio of two such stds is used.
    """
    if isinstance(x, torch.Tensor):
        return values.std(dim=list(range(1, values.dim())), keepdim=True)
    # Each item's rows are contiguous (SparseTensor invariant): reduce slices, not index_add_, whose atomic float
    # adds on CUDA make the same seed give different results run to run.
    off = x.batch_offsets()
    row = values.reshape(values.shape[0], -1)
    # Expanded per item rather than repeat_interleave(counts tensor): that tensor's host->device copy would block
    # the host on every guided step (see _ModelRunner._call).
    stds = []
    for b in range(len(off) - 1):
        seg = row[off[b] : off[b + 1]]
        mean, mean2 = seg.mean(), (seg * seg).mean()
        stds.append((mean2 - mean * mean).sqrt().expand(off[b + 1] - off[b]))
    std = torch.cat(stds)
    return std.reshape((-1,) + (1,) * (values.dim() - 1))


class _ModelRunner:
    """Calls the velocity model (one condition, or cond + uncond separately or batched) and counts calls."""

    def __init__(self, model_fn, extra: dict[str, Any], batched: bool, zero_neg: bool = False):
        self.model_fn, self.extra, self.batched, self.calls = model_fn, extra, batched, 0
        self.zero_neg = zero_neg
        self._extra2: dict[str, Any] | None = None
        self._cond2: tuple[Any, Any, torch.Tensor] | None = None

    def _call(self, x: Latent, t: float, cond, extra) -> torch.Tensor:
        n_items = batch_items(x)
        # torch.full, not torch.tensor(list, device=...): a host->device copy blocks the host until the GPU queue
        # drains, once per model call (H200: 428 ms behind 20 queued 8k GEMMs vs 0.04 ms). Same float32 values.
        t_tensor = torch.full((n_items,), 1000 * t, device=x.device, dtype=torch.float32)
        out = self.model_fn(x, t_tensor, cond, **extra)
        self.calls += 1
        if isinstance(x, SparseTensor) != isinstance(out, SparseTensor) or out.shape != x.shape:
            raise InputError(
                f"model_fn must return a velocity of x's type and shape {tuple(x.shape)} ({type(x).__name__}); "
                f"got {_describe(out)}"
            )
        return _feats(out)

    def _negative(self, extra: dict[str, Any], first: int) -> dict[str, Any]:
        """extra plus ``zero_cond_from=first`` when the negative condition is zeros the model knows to skip."""
        return {**extra, "zero_cond_from": first} if self.zero_neg else extra

    def single(self, x: Latent, t: float, cond, *, negative: bool = False) -> torch.Tensor:
        return self._call(x, t, cond, self._negative(self.extra, 0) if negative else self.extra)

    def pair(self, x: Latent, t: float, cond, neg_cond) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batched:
            return self._call(x, t, cond, self.extra), self._call(x, t, neg_cond, self._negative(self.extra, 0))
        if self._extra2 is None:  # per-item kwargs are the same every step: double them once
            self._extra2 = self._negative({k: _double(v) for k, v in self.extra.items()}, batch_items(x))
        if self._cond2 is None or self._cond2[0] is not cond or self._cond2[1] is not neg_cond:
            self._cond2 = (cond, neg_cond, torch.cat([cond, neg_cond]))  # the same pair every step: concatenate once
        v = self._call(_double(x), t, self._cond2[2], self._extra2)
        n = v.shape[0] // 2
        return v[:n], v[n:]


def _double(v: Any) -> Any:
    """A per-item tensor repeated as a batch of 2B (sparse: second copy's batch index + B); other values unchanged."""
    if isinstance(v, torch.Tensor):
        return torch.cat([v, v])
    if not isinstance(v, SparseTensor):
        return v
    # The doubled coordinates are a pure function of v's coords: memoise them in v's coordinate cache, so every step
    # reuses one doubled SparseTensor (and the neighbour maps the model caches on it).
    template = v.get_cache("sampling.batched_cfg")
    if template is None:
        second = v.coords.clone()
        second[:, 0] += v.batch_size
        template = SparseTensor(torch.empty(2 * len(v), 0, device=v.device), torch.cat([v.coords, second]))
        v.set_cache("sampling.batched_cfg", template)
    return template.replace(torch.cat([v.feats, v.feats]))


def _feats(x: Latent) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x: Latent, values: torch.Tensor) -> Latent:
    return x.replace(values) if isinstance(x, SparseTensor) else values


def _describe(v: Any) -> str:
    if isinstance(v, (torch.Tensor, SparseTensor)):
        return f"{type(v).__name__} {tuple(v.shape)}"
    return type(v).__name__
