"""Stage 1: the sparse structure (SPEC.md sections 4, 6, 14).

Dense flow on a 16^3 x 8 latent conditioned on DINOv3 tokens at 512, decoded by the TRELLIS v1 structure
decoder to 64^3 occupancy logits, then reduced to the occupied voxels of a 32^3 or 64^3 grid.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError
from ..structure import occupancy_coords
from ..sampling import SamplerParams
from . import rng
from .components import ComponentSource, batched_cfg, cuda_graphs, keep_graphs
from .guidance import run_sampler
from .types import Conditioning, Structure

FLOW, DECODER = "sparse_structure_flow_model", "sparse_structure_decoder"


@torch.no_grad()
def sample_structure(
    components: ComponentSource,
    cond: Conditioning,
    *,
    resolution: int,
    params: SamplerParams,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Structure:
    """Occupied voxels of the sparse structure at ``resolution`` (32 or 64).

    Draws the SS noise [1, 8, 16, 16, 16] from ``generator`` (advancing it); the result carries the
    generator state after the draw. Raises InputError if the structure comes out empty.
    """
    if resolution not in (32, 64):
        raise InputError(f"sparse-structure resolution must be 32 or 64; got {resolution}")
    device = components.device
    with components.use(FLOW) as flow:
        cfg = flow.config
        noise = rng.randn((1, cfg.in_channels, cfg.resolution, cfg.resolution, cfg.resolution), generator, device)
        z = run_sampler(flow, noise, cond.at(512), params, progress=progress, should_stop=should_stop,
                        batched_cfg=batched_cfg(components), cuda_graphs=cuda_graphs(components),
                        keep_graphs=keep_graphs(components),
                        multiview_mode=cond.multiview_mode)
    with components.use(DECODER) as decoder:
        logits = decoder(z)
    coords = occupancy_coords(logits, resolution)
    if coords.shape[0] == 0:
        raise InputError(
            "the sparse structure is empty (the model predicted no occupied voxel). Try another seed, a higher "
            "guidance strength, or check that the image shows one object on a clean background."
        )
    return Structure(coords=coords.int(), resolution=resolution, rng_state=generator.get_state())


def coarsen(structure: Structure, resolution: int) -> Structure:
    """The structure on a coarser grid: a voxel is occupied if any of its children is.

    Identical to the reference's max-pool of the 64^3 occupancy (logical OR over 2x2x2) followed by argwhere:
    unique() sorts lexicographically, which is argwhere's order.
    """
    if resolution == structure.resolution:
        return structure
    factor = structure.resolution // resolution
    if resolution > structure.resolution or structure.resolution % resolution:
        raise InputError(
            f"a {structure.resolution}^3 sparse structure cannot feed a stage that needs {resolution}^3; "
            f"sample the structure at {resolution} (pipeline type '1024' needs 64, the others 32)"
        )
    c = structure.coords.clone()
    c[:, 1:] //= factor
    return Structure(coords=torch.unique(c, dim=0).int(), resolution=resolution, rng_state=structure.rng_state)
