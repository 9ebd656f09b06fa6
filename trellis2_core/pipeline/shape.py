"""Stage 2: the shape latent (SPEC.md sections 12 and 14), single-resolution or cascade.

The flow samples in normalised latent space; the result is denormalised (z = z_n * std + mean) before it
leaves this stage, because decoders and the cascade's upsampler take denormalised latents.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import InputError
from ..sampling import SamplerParams
from ..sparse import SparseTensor
from ..weights import Normalization
from . import rng
from .components import ComponentSource, batched_cfg, cuda_graphs
from .guidance import run_sampler
from .structure import coarsen
from .types import Conditioning, ShapeLatent, Structure, plan

log = logging.getLogger(__name__)

DECODER = "shape_slat_decoder"
MAX_TOKENS = 49152  # the reference's cap on HR tokens in the 1536 cascade


def normalise(feats: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(z - mean) / std per channel; ``norm`` is a pipeline.json ``*_normalization`` entry."""
    mean, std = _stats(norm, feats)
    return (feats - mean) / std


def denormalise(feats: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """z_n * std + mean per channel."""
    mean, std = _stats(norm, feats)
    return feats * std + mean


def _stats(norm: Normalization, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not len(norm.mean) == len(norm.std) == feats.shape[-1]:
        raise InputError(
            f"latent has {feats.shape[-1]} channels but the pipeline's normalisation has {len(norm.mean)} means "
            f"and {len(norm.std)} stds; "
            "the flow model and pipeline.json do not belong together"
        )
    stats = rng.upload(torch.tensor([norm.mean, norm.std], dtype=feats.dtype), feats.device)  # no wait (rng.py)
    return stats[0], stats[1]


def _flow(
    components: ComponentSource,
    role: str,
    coords: torch.Tensor,
    cond: torch.Tensor,
    params: SamplerParams,
    norm: Normalization,
    generator: torch.Generator,
    progress,
    should_stop,
    multiview_mode: str = "concat",
) -> SparseTensor:
    with components.use(role) as flow:
        noise = rng.randn((coords.shape[0], flow.config.in_channels), generator, components.device)
        x = SparseTensor(noise, coords.to(components.device))
        out = run_sampler(flow, x, cond, params, progress=progress, should_stop=should_stop, multiview_mode=multiview_mode,
                          batched_cfg=batched_cfg(components), cuda_graphs=cuda_graphs(components))
    return out.replace(denormalise(out.feats.float(), norm))


def hr_coords_for(upsampled: torch.Tensor, lr_resolution: int, target: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Quantise the decoder's upsampled voxels (coords at ``lr_resolution``^3) to the HR latent grid.

    The reference's rule (SPEC 14): q = int((c + 0.5) / lr_resolution * (R // 16)); accept R if the number of
    unique voxels is below ``max_tokens`` or R == 1024, else lower R by 128 and retry.
    Returns (coords [M, 4] int32 sorted lexicographically, R).
    """
    res = target
    while True:
        q = ((upsampled[:, 1:].float() + 0.5) / lr_resolution * (res // 16)).int()
        coords = torch.unique(torch.cat([upsampled[:, :1].int(), q], dim=1), dim=0)
        if coords.shape[0] < max_tokens or res <= 1024:
            if res != target:
                log.warning("%d tokens exceed the cap of %d: resolution lowered from %d to %d", coords.shape[0], max_tokens, target, res)
            return coords.int(), res
        res -= 128


@torch.no_grad()
def sample_shape(
    components: ComponentSource,
    cond: Conditioning,
    structure: Structure,
    *,
    pipeline_type: str,
    params: SamplerParams,
    normalization: Normalization,
    generator: torch.Generator,
    max_tokens: int = MAX_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ShapeLatent:
    """Shape latent for ``structure`` following ``pipeline_type`` ('512', '1024', '1024_cascade', '1536_cascade').

    progress(done, total) counts sampler steps over all flows of the stage (2 x steps for a cascade).
    """
    p = plan(pipeline_type)
    if max_tokens < 1:
        raise InputError(f"max_tokens must be positive; got {max_tokens}")
    structure = coarsen(structure, p.structure_resolution)
    n_flows = len(p.shape_models)
    total = params.steps * n_flows

    def stage_progress(offset: int):
        return None if progress is None else (lambda done, _total: progress(offset + done, total))

    latent = _flow(
        components, p.shape_models[0], structure.coords, cond.at(p.shape_cond[0]), params, normalization,
        generator, stage_progress(0), should_stop, cond.multiview_mode,
    )  # fmt: skip
    resolution = 16 * structure.resolution  # the SC-VAE upsamples the latent grid 16x per axis
    if p.cascade:
        with components.use(DECODER) as decoder:
            upsampled = decoder.upsample(latent, upsample_times=4)
        up_coords = upsampled.coords if isinstance(upsampled, SparseTensor) else upsampled
        coords, resolution = hr_coords_for(up_coords, 512, p.target_resolution, max_tokens)
        latent = _flow(
            components, p.shape_models[1], coords, cond.at(p.shape_cond[1]), params, normalization,
            generator, stage_progress(params.steps), should_stop, cond.multiview_mode,
        )  # fmt: skip
    return ShapeLatent(latent=latent, resolution=resolution, rng_state=generator.get_state())
