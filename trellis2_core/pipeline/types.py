"""What flows between the stages. Every value is immutable in spirit: stages return new objects, never edit inputs.

Frames: voxel coordinates are integer grid indices (x, y, z) in the reference's Z-up object frame, the cube
[-0.5, 0.5]^3 at grid resolution R: world position p = (v / R) - 0.5 for voxel-unit position v.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..sparse import SparseTensor
from .multiview import check_mode

PIPELINE_TYPES = ("512", "1024", "1024_cascade", "1536_cascade")


@dataclass(frozen=True)
class PipelinePlan:
    """Which models and resolutions one pipeline type uses (SPEC.md section 14)."""

    name: str
    structure_resolution: int  # 32 (64^3 occupancy max-pooled x2) or 64
    shape_models: tuple[str, ...]  # roles, low resolution first
    shape_cond: tuple[int, ...]  # DINOv3 resolution per shape model
    tex_model: str
    tex_cond: int
    target_resolution: int  # final grid R (a 1536 cascade may fall back to less)

    @property
    def cascade(self) -> bool:
        return len(self.shape_models) == 2

    @property
    def cond_resolutions(self) -> tuple[int, ...]:
        return tuple(sorted({512, *self.shape_cond, self.tex_cond}))


def plan(pipeline_type: str) -> PipelinePlan:
    """The plan of an official pipeline type; a clear error names the valid ones."""
    if pipeline_type == "512":
        return PipelinePlan("512", 32, ("shape_slat_flow_model_512",), (512,), "tex_slat_flow_model_512", 512, 512)
    if pipeline_type == "1024":
        return PipelinePlan("1024", 64, ("shape_slat_flow_model_1024",), (1024,), "tex_slat_flow_model_1024", 1024, 1024)
    if pipeline_type in ("1024_cascade", "1536_cascade"):
        target = 1024 if pipeline_type == "1024_cascade" else 1536
        return PipelinePlan(
            pipeline_type,
            32,
            ("shape_slat_flow_model_512", "shape_slat_flow_model_1024"),
            (512, 1024),
            "tex_slat_flow_model_1024",
            1024,
            target,
        )
    raise InputError(f"pipeline_type must be one of {list(PIPELINE_TYPES)}; got {pipeline_type!r}")


@dataclass(frozen=True)
class Conditioning:
    """DINOv3 image tokens per resolution. tokens[512]: [V, 1029, C]; tokens[1024]: [V, 4101, C].

    V is the number of views (1 for a single image). The negative condition is all-zero tokens of the
    same shape (SPEC 13.4), made on demand so it costs no memory until a guided step needs it.
    multiview_mode: how the stages combine V > 1 views ("concat", "average", "alternate"; multiview.py);
    ignored for one view. ``with_multiview_mode`` returns a copy with another mode.
    """

    tokens: dict[int, torch.Tensor]
    multiview_mode: str = "concat"

    def __post_init__(self) -> None:
        check_mode(self.multiview_mode)
        tokens = self.tokens if isinstance(self.tokens, dict) else {}
        ok = bool(tokens) and all(torch.is_tensor(t) and t.dim() == 3 for t in tokens.values())
        if not ok or len({int(t.shape[0]) for t in tokens.values()}) != 1:
            got = {r: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for r, t in tokens.items()}
            raise InputError(
                f"Conditioning.tokens must map resolution -> [V, L, C] with one V for all; got "
                f"{got if isinstance(self.tokens, dict) else type(self.tokens).__name__}"
            )

    def with_multiview_mode(self, mode: str) -> Conditioning:
        return dataclasses.replace(self, multiview_mode=mode)

    def at(self, resolution: int) -> torch.Tensor:
        if resolution not in self.tokens:
            raise InputError(
                f"this conditioning has DINOv3 tokens at {sorted(self.tokens)} but the stage needs {resolution}; "
                f"encode the image at {resolution} too (pipeline types other than '512' need 1024)"
            )
        return self.tokens[resolution]

    @property
    def num_views(self) -> int:
        return next(iter(self.tokens.values())).shape[0]


@dataclass(frozen=True)
class Structure:
    """Occupied voxels of the sparse structure: coords [N, 4] int32 (batch 0, x, y, z) on a `resolution`^3 grid.

    rng_state: the CPU generator state after this stage's noise draws, so a following stage can continue
    the reference's single random stream (one seed reproduces the reference end to end).
    """

    coords: torch.Tensor
    resolution: int
    rng_state: torch.Tensor | None = None

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])


@dataclass(frozen=True)
class ShapeLatent:
    """Denormalised shape latent (32 channels) on the latent grid of the final resolution R (grid = R // 16)."""

    latent: SparseTensor
    resolution: int
    rng_state: torch.Tensor | None = None


@dataclass(frozen=True)
class MaterialLatent:
    """Denormalised PBR material latent (32 channels) on the same voxels as its shape latent."""

    latent: SparseTensor
    resolution: int
    rng_state: torch.Tensor | None = None


def replace(obj, **changes):
    """dataclasses.replace, re-exported so stage code reads as 'a new object with ...'."""
    return dataclasses.replace(obj, **changes)
