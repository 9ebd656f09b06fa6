"""OVoxel: the sparse voxels of one object, carrying flexible-dual-grid geometry and PBR attributes (SPEC.md 2, 9, 10).

Frame: object space is the axis-aligned cube ``aabb`` (default ``[-0.5, 0.5]^3``), Z-up as in the reference (GLB export
turns it Y-up). ``resolution`` R voxels per axis; voxel ``(x, y, z)`` spans ``[x, x+1] x [y, y+1] x [z, z+1]`` in voxel
units and a voxel-unit position ``v`` sits at ``p = v / R - 0.5`` in object space (default aabb). Voxel centre = coords + 0.5.

One OVoxel holds ONE object (one batch item). Batched decoder outputs are split per item with
``OVoxel.from_decoder_output(..., batch_index=b)``.

Immutable in spirit: no method mutates; ``with_attributes`` / ``to`` return new objects that share unchanged tensors.
Nodes can therefore pass an OVoxel on without copying (ComfyUI caches outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch

from ..errors import InputError
from ..sparse import SparseTensor
from .flexible_dual_grid import DEFAULT_AABB, fdg_head, flexible_dual_grid_to_mesh

__all__ = ["OVoxel", "PBR_LAYOUT"]

# Channel layout of the texture decoder output after ``v * 0.5 + 0.5`` (reference ``pbr_attr_layout``).
PBR_LAYOUT: Mapping[str, slice] = MappingProxyType(
    {"base_color": slice(0, 3), "metallic": slice(3, 4), "roughness": slice(4, 5), "alpha": slice(5, 6)}
)


@dataclasses.dataclass(frozen=True, eq=False)
class OVoxel:
    """Sparse voxels of one object at grid ``resolution``.

    Fields (N = number of voxels; all tensors on one device):
        coords          [N, 3] int32 (x, y, z), unique, each in ``[0, resolution)``. Row order is meaningful: the
                        decoder emits (parent order) x (child index ascending) and the texture decoder keeps it.
        resolution      R (int), voxels per axis.
        vertex_offset   [N, 3] float, dual vertex inside its voxel in voxel units ([0, 1] from data, (-0.5, 1.5) from
                        the decoder).
        edge_flags      [N, 3] bool, surface crosses the voxel's x/y/z max-corner edge (SPEC 10).
        split_weight    [N, 1] float > 0, quad-split weights from the decoder; None for voxelised meshes.
        attributes      [N, C] float PBR attributes, or None. With the default layout C = 6: base_color RGB [0:3],
                        metallic [3], roughness [4], alpha [5], nominally in [0, 1] but NOT clamped (clamping happens at
                        texture baking, as in the reference).
        attribute_layout name -> channel slice of ``attributes`` (read-only mapping).
        subdivision_guides list of SparseTensor of subdivision logits [N_level, 8] (batch column 0), one per decoder
                        level, as returned by the shape decoder with ``return_subs=True``; the texture decoder's
                        ``guide_subs``. None when unknown (e.g. voxelised from a mesh).
        aabb            ((min x, y, z), (max x, y, z)) of the grid in object space.
    """

    coords: torch.Tensor
    resolution: int
    vertex_offset: torch.Tensor
    edge_flags: torch.Tensor
    split_weight: torch.Tensor | None = None
    attributes: torch.Tensor | None = None
    attribute_layout: Mapping[str, slice] = dataclasses.field(default_factory=lambda: PBR_LAYOUT)
    subdivision_guides: tuple[SparseTensor, ...] | None = None
    aabb: tuple[tuple[float, float, float], tuple[float, float, float]] = DEFAULT_AABB

    def __post_init__(self) -> None:
        c = self.coords
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != 3 or c.dtype != torch.int32:
            got = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, torch.Tensor) else type(c).__name__
            raise InputError(f"OVoxel.coords must be an int32 tensor [N, 3] (x, y, z); got {got}. Use coords[:, 1:].int().")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution <= 0:
            raise InputError(f"OVoxel.resolution must be a positive int (voxels per axis, e.g. 512); got {self.resolution!r}")
        n = c.shape[0]
        if n and (int(c.min()) < 0 or int(c.max()) >= self.resolution):
            raise InputError(
                f"OVoxel.coords must lie in [0, resolution={self.resolution}); got range [{int(c.min())}, {int(c.max())}]. "
                "Pass the resolution the voxels were made at."
            )
        self._check_rows("vertex_offset", self.vertex_offset, 3, float_=True)
        self._check_rows("edge_flags", self.edge_flags, 3, bool_=True)
        if self.split_weight is not None:
            self._check_rows("split_weight", self.split_weight, 1, float_=True)
        if self.attributes is not None:
            self._check_rows("attributes", self.attributes, None, float_=True)
        layout = self.attribute_layout
        if not isinstance(layout, Mapping) or not all(isinstance(s, slice) for s in layout.values()):
            raise InputError(f"OVoxel.attribute_layout must map names to channel slices; got {layout!r}")
        if self.attributes is not None:
            width = self.attributes.shape[1]
            bad = [k for k, s in layout.items() if not (0 <= (s.start or 0) < (s.stop or 0) <= width)]
            if bad:
                raise InputError(f"OVoxel.attribute_layout entries {bad} fall outside the {width} attribute channels")
        object.__setattr__(self, "attribute_layout", MappingProxyType(dict(layout)))
        if self.subdivision_guides is not None:
            guides = tuple(self.subdivision_guides)
            if not all(isinstance(g, SparseTensor) for g in guides):
                raise InputError("OVoxel.subdivision_guides must be a sequence of SparseTensor logits (shape decoder `subs`)")
            object.__setattr__(self, "subdivision_guides", guides)
        try:
            aabb = tuple(tuple(float(v) for v in row) for row in self.aabb)
        except TypeError as e:
            raise InputError(f"OVoxel.aabb must be ((min x, y, z), (max x, y, z)); got {self.aabb!r}") from e
        if len(aabb) != 2 or any(len(r) != 3 for r in aabb) or any(lo >= hi for lo, hi in zip(*aabb)):
            raise InputError(f"OVoxel.aabb must be ((min x, y, z), (max x, y, z)) with min < max; got {self.aabb!r}")
        object.__setattr__(self, "aabb", aabb)

    def _check_rows(self, name: str, t, width: int | None, *, float_: bool = False, bool_: bool = False) -> None:
        n = self.coords.shape[0]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"OVoxel.{name} must be a tensor; got {type(t).__name__}")
        ok = t.dim() == 2 and t.shape[0] == n and (width is None or t.shape[1] == width)
        ok = ok and (not float_ or t.dtype.is_floating_point) and (not bool_ or t.dtype == torch.bool)
        if not ok:
            want = f"[N={n}, {width if width is not None else 'C'}] {'bool' if bool_ else 'float'}"
            raise InputError(f"OVoxel.{name} must be {want} (one row per voxel); got {tuple(t.shape)} {t.dtype}")
        if t.device != self.coords.device:
            raise InputError(f"OVoxel.{name} is on {t.device} but coords on {self.coords.device}; move both to one device")

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_decoder_output(
        cls,
        coords: torch.Tensor,
        raw: torch.Tensor,
        resolution: int,
        *,
        batch_index: int = 0,
        subdivision_guides: Sequence[SparseTensor] | None = None,
        voxel_margin: float = 0.5,
    ) -> OVoxel:
        """From the shape decoder's output: coords [N, 4] int32 (b, x, y, z) and raw [N, 7] logits, item ``batch_index``.

        Guides, if given, are kept only for the chosen item (their batch column is reset to 0).
        """
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise InputError(f"coords must be SparseTensor coords [N, 4] (b, x, y, z); got {tuple(coords.shape)}")
        rows = coords[:, 0] == batch_index
        offset, flags, split = fdg_head(raw[rows], voxel_margin)
        guides = None
        if subdivision_guides is not None:
            guides = tuple(_batch_rows(g, batch_index) for g in subdivision_guides)
        return cls(coords[rows, 1:].int(), resolution, offset.float(), flags, split.float(), subdivision_guides=guides)

    def with_attributes(self, attributes: torch.Tensor | None, layout: Mapping[str, slice] | None = None) -> OVoxel:
        """A new OVoxel with these PBR attributes [N, C] (same voxels, same row order); self is unchanged."""
        return dataclasses.replace(self, attributes=attributes, attribute_layout=self.attribute_layout if layout is None else layout)

    def to(self, device: torch.device | str) -> OVoxel:
        """A copy on ``device`` (float fields keep their dtype)."""

        def mv(t):
            return None if t is None else t.to(device)

        guides = None if self.subdivision_guides is None else tuple(g.to(device) for g in self.subdivision_guides)
        return dataclasses.replace(
            self,
            coords=self.coords.to(device),
            vertex_offset=self.vertex_offset.to(device),
            edge_flags=self.edge_flags.to(device),
            split_weight=mv(self.split_weight),
            attributes=mv(self.attributes),
            subdivision_guides=guides,
        )

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        lo, hi = self.aabb
        return tuple((h - l) / self.resolution for l, h in zip(lo, hi))  # type: ignore[return-value]

    def attribute(self, name: str) -> torch.Tensor:
        """The channels of one PBR attribute, e.g. ``attribute("base_color")`` -> [N, 3]."""
        if self.attributes is None:
            raise InputError(f"this OVoxel has no attributes; decode the texture latent first (asked for {name!r})")
        if name not in self.attribute_layout:
            raise InputError(f"unknown attribute {name!r}; this OVoxel has {sorted(self.attribute_layout)}")
        return self.attributes[:, self.attribute_layout[name]]

    def voxel_centers(self) -> torch.Tensor:
        """[N, 3] float32 object-space centres of the voxels."""
        lo = torch.tensor(self.aabb[0], dtype=torch.float32, device=self.device)
        size = torch.tensor(self.voxel_size, dtype=torch.float32, device=self.device)
        return (self.coords.float() + 0.5) * size + lo

    def to_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flexible-dual-grid extraction: (vertices [N, 3] float32 object space, faces [F, 3] int64). See SPEC 10."""
        return flexible_dual_grid_to_mesh(
            self.coords, self.vertex_offset, self.edge_flags, self.split_weight, self.resolution, self.aabb
        )

    def __repr__(self) -> str:
        extra = "" if self.attributes is None else f", attributes={tuple(self.attributes.shape)}"
        return f"OVoxel(voxels={self.num_voxels}, resolution={self.resolution}{extra}, device={self.device})"


def _batch_rows(t: SparseTensor, b: int) -> SparseTensor:
    rows = t.coords[:, 0] == b
    coords = t.coords[rows].clone()
    coords[:, 0] = 0
    return SparseTensor(t.feats[rows], coords)
