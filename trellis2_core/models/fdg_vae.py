"""Shape SC-VAE on flexible dual grids: FlexiDualGridVaeEncoder / FlexiDualGridVaeDecoder (SPEC.md section 9).

The encoder reads an O-Voxel's geometry (dual vertex offsets in [0, 1] voxel units, 3 edge-intersection flags per
voxel); the decoder predicts the same fields at 16x the latent resolution. Mesh extraction is not done here: the
decoder returns the raw 7-channel features and ``head`` turns them into the fields the flexible-dual-grid
extractor (``trellis2_core.ovoxel``) consumes.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError, InputError
from ..ovoxel.flexible_dual_grid import fdg_head
from ..sparse import SparseTensor
from .config import ModelConfig
from .sparse_unet_vae import SparseUnetVaeDecoder, SparseUnetVaeEncoder, _check_unet


@dataclasses.dataclass(frozen=True)
class FlexiDualGridVaeEncoderConfig(ModelConfig):
    model_channels: tuple[int, ...]
    latent_channels: int
    num_blocks: tuple[int, ...]
    block_type: tuple[str, ...]
    down_block_type: tuple[str, ...]
    block_args: tuple
    use_fp16: bool = False

    def __post_init__(self):
        _check_unet(self, "down_block_type", "SparseResBlockS2C3d", down=True)


@dataclasses.dataclass(frozen=True)
class FlexiDualGridVaeDecoderConfig(ModelConfig):
    resolution: int  # final grid size; overwritten per run by set_resolution (the released value is unused)
    model_channels: tuple[int, ...]
    latent_channels: int
    num_blocks: tuple[int, ...]
    block_type: tuple[str, ...]
    up_block_type: tuple[str, ...]
    block_args: tuple
    voxel_margin: float = 0.5
    use_fp16: bool = False

    def __post_init__(self):
        _check_unet(self, "up_block_type", "SparseResBlockC2S3d", down=False)
        if self.voxel_margin < 0:
            raise ConfigError(f"FlexiDualGridVaeDecoder: voxel_margin must be >= 0; got {self.voxel_margin}")


class FlexiDualGridVaeEncoder(SparseUnetVaeEncoder):
    """O-Voxel geometry at grid R -> shape latent mean at grid R/16 (released config).

    forward(vertices, intersected):
      vertices    SparseTensor feats [N, 3] float, dual vertex offsets in [0, 1] voxel units (``dual*R - coords``)
      intersected SparseTensor feats [N, 3] bool, edge flags (x, y, z), on the same coords
    returns the latent mean SparseTensor [Np, latent_channels] carrying the records for cache-guided decoding.
    """

    Config = FlexiDualGridVaeEncoderConfig

    @staticmethod
    def _in_channels(config) -> int:
        return 6

    def forward(self, vertices: SparseTensor, intersected: SparseTensor) -> SparseTensor:
        if vertices.feats.dim() != 2 or vertices.feats.shape[1] != 3:
            raise InputError(f"FlexiDualGridVaeEncoder: vertices feats must be [N, 3] offsets in [0, 1]; got {tuple(vertices.feats.shape)}")
        if intersected.feats.shape != vertices.feats.shape:
            raise InputError(
                f"FlexiDualGridVaeEncoder: intersected feats must be [N, 3] like vertices {tuple(vertices.feats.shape)}; "
                f"got {tuple(intersected.feats.shape)}"
            )
        if intersected.coords is not vertices.coords and not torch.equal(intersected.coords, vertices.coords):
            raise InputError("FlexiDualGridVaeEncoder: vertices and intersected must share the same coords (same rows)")
        v = vertices.feats.float()
        x = vertices.replace(torch.cat([v - 0.5, intersected.feats.to(v.dtype) - 0.5], dim=1))
        return super().forward(x)


class FlexiDualGridVaeDecoder(SparseUnetVaeDecoder):
    """Shape latent -> raw flexible-dual-grid fields [Nf, 7] at grid ``resolution`` (predicted subdivisions).

    forward(x, return_subs=False) (inherited; guide_subs is rejected since it predicts its own subdivisions) ->
    raw SparseTensor (and the per-level subdivision logits if return_subs);
    ``head(raw.feats)`` gives (vertex_offset, edge_flags, split_weight) for mesh extraction at ``self.resolution``.
    """

    Config = FlexiDualGridVaeDecoderConfig

    def __init__(self, config, *, device=None, dtype=None, ops=None):
        super().__init__(config, device=device, dtype=dtype, ops=ops)
        self.resolution = config.resolution
        self.voxel_margin = config.voxel_margin

    @staticmethod
    def _out_channels(config) -> int:
        return 7

    @staticmethod
    def _pred_subdiv(config) -> bool:
        return True

    def set_resolution(self, resolution: int) -> None:
        """Final grid size the decoded voxels live on (512 / 1024 / 1536 in the pipeline)."""
        if not isinstance(resolution, int) or resolution <= 0:
            raise InputError(f"set_resolution: resolution must be a positive int grid size; got {resolution!r}")
        self.resolution = resolution

    def head(self, raw_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vertex_offset [N,3] f32, edge_flags [N,3] bool, split_weight [N,1] f32) from raw [N, 7]."""
        return fdg_head(raw_feats, self.voxel_margin)
