"""Stage 3: the PBR material latent (SPEC.md sections 5, 12, 14).

The texture flow sees [noise (32) | normalised shape latent (32)] per voxel (noise first) and predicts the
velocity of the 32 noise channels; its result is denormalised with the texture statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..sampling import SamplerParams
from . import rng
from .components import ComponentSource, batched_cfg, cuda_graphs
from .guidance import run_sampler
from ..weights import Normalization
from .shape import denormalise, normalise
from .types import Conditioning, MaterialLatent, ShapeLatent


def tex_role(resolution: int) -> tuple[str, int]:
    """(texture flow role, DINOv3 resolution) for a final grid: the 512 model at 512, the 1024 model above."""
    return ("tex_slat_flow_model_512", 512) if resolution <= 512 else ("tex_slat_flow_model_1024", 1024)


@torch.no_grad()
def sample_material(
    components: ComponentSource,
    cond: Conditioning,
    shape: ShapeLatent,
    *,
    params: SamplerParams,
    shape_normalization: Normalization,
    tex_normalization: Normalization,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MaterialLatent:
    """Material latent on the voxels of ``shape`` (same coords, same row order)."""
    role, cond_res = tex_role(shape.resolution)
    device = components.device
    shape_latent = shape.latent.to(device)
    concat = shape_latent.replace(normalise(shape_latent.feats.float(), shape_normalization))
    with components.use(role) as flow:
        n_noise = flow.config.in_channels - concat.feats.shape[1]
        noise = rng.randn((concat.coords.shape[0], n_noise), generator, device)
        x = concat.replace(noise)  # same voxels: shares the neighbour caches
        out = run_sampler(
            flow, x, cond.at(cond_res), params, progress=progress, should_stop=should_stop, concat_cond=concat,
            multiview_mode=cond.multiview_mode, batched_cfg=batched_cfg(components), cuda_graphs=cuda_graphs(components),
        )
    latent = out.replace(denormalise(out.feats.float(), tex_normalization))
    return MaterialLatent(latent=latent, resolution=shape.resolution, rng_state=generator.get_state())
