"""Sparse trilinear sampling of per-voxel attributes (SPEC 15 step 4), on any device.

Grid coordinates `g` are in voxel units: the engine's world point p in the cube [-0.5, 0.5]^3 at resolution R is
g = (p - aabb_min) / voxel_size = (p + 0.5) * R. The value of voxel i sits at its centre, coords_i + 0.5.
For a query g the 8 corners are floor(g - 0.5) + {0,1}^3; each one that is an occupied voxel contributes with weight
prod_axes(1 - |g - corner - 0.5|); the weights of the present corners are renormalised by their sum, so sampling near
the edge of the occupied set does not fade towards zero. No corner present -> 0 (SPEC 15; the reference's
FlexGEMM grid_sample does the same with a GPU hash map, we use a sorted-key binary search: exact, deterministic).
"""

from __future__ import annotations

import torch

from ..errors import InputError

_CORNERS = torch.tensor([[i >> 0 & 1, i >> 1 & 1, i >> 2 & 1] for i in range(8)], dtype=torch.int64)  # x = bit 0


class VoxelAttributeField:
    """Occupied voxels with attributes, prepared for repeated sampling (the sort happens once).

    coords: [N, 3] integer voxel indices (x, y, z) >= 0, or [N, 4] (batch, x, y, z) of one batch item (the batch column
    is dropped). attrs: [N, C] float. Duplicate coords are not allowed (the field would be ambiguous).
    """

    def __init__(self, coords: torch.Tensor, attrs: torch.Tensor):
        if not isinstance(coords, torch.Tensor) or coords.ndim != 2 or coords.shape[1] not in (3, 4):
            raise InputError(f"coords: expected an integer tensor [N, 3] (x, y, z) or [N, 4] (b, x, y, z), "
                             f"got {getattr(coords, 'shape', type(coords).__name__)}")
        if coords.shape[1] == 4:
            if coords.shape[0] and int(coords[:, 0].max()) != int(coords[:, 0].min()):
                raise InputError("coords: got several batch items in one [N, 4] tensor; sample one item at a time "
                                 "(SparseTensor.batch_item(b))")
            coords = coords[:, 1:]
        if coords.dtype.is_floating_point:
            raise InputError(f"coords: expected an integer dtype, got {coords.dtype}; voxel indices are integers")
        if not isinstance(attrs, torch.Tensor) or attrs.ndim != 2 or attrs.shape[0] != coords.shape[0]:
            raise InputError(f"attrs: expected a tensor [N={coords.shape[0]}, C] (one row per voxel), "
                             f"got {getattr(attrs, 'shape', type(attrs).__name__)}")
        coords = coords.to(torch.int64)
        if coords.shape[0] and int(coords.min()) < 0:
            raise InputError("coords: voxel indices must be >= 0 (grid coordinates, not world positions)")
        self.device = attrs.device
        self.extent = (coords.max(0).values + 1) if coords.shape[0] else torch.ones(3, dtype=torch.int64)
        self.extent = self.extent.to(self.device)
        keys = self._key(coords.to(self.device))
        self.keys, order = torch.sort(keys)
        if self.keys.numel() > 1 and bool((self.keys[1:] == self.keys[:-1]).any()):
            raise InputError("coords: duplicate voxel coordinates; each voxel must appear once")
        self.attrs = attrs[order.to(attrs.device)]

    def _key(self, c: torch.Tensor) -> torch.Tensor:
        e = self.extent
        return (c[..., 0] * e[1] + c[..., 1]) * e[2] + c[..., 2]

    @property
    def channels(self) -> int:
        return int(self.attrs.shape[1])

    def sample(self, g: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Trilinear values at grid points g [P, 3] (voxel units, float) -> [P, C] in attrs' dtype.

        Processed in chunks of `chunk` points so memory stays ~ chunk x 8 x (C + 4) x 8 bytes.
        """
        if not isinstance(g, torch.Tensor) or g.ndim != 2 or g.shape[1] != 3 or not g.dtype.is_floating_point:
            raise InputError(f"g: expected a float tensor [P, 3] of grid coordinates, got {getattr(g, 'shape', g)}")
        out = torch.zeros(g.shape[0], self.channels, dtype=self.attrs.dtype, device=self.device)
        if self.keys.numel() == 0:
            return out
        for s in range(0, g.shape[0], chunk):
            out[s:s + chunk] = self._sample_chunk(g[s:s + chunk].to(self.device))
        return out

    def _sample_chunk(self, g: torch.Tensor) -> torch.Tensor:
        g = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        base_f = torch.floor(g - 0.5)
        frac = g - 0.5 - base_f                                                # [P, 3] in [0, 1)
        base = base_f.to(torch.int64)
        off = _CORNERS.to(g.device)
        w = torch.where(off.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # [P, 8], corner = dx+2dy+4dz
        corners = base[:, None, :] + off                                       # [P, 8, 3]
        inside = ((corners >= 0) & (corners < self.extent)).all(-1)
        # corners (x, y, z) and (x, y, z+1) have consecutive keys: one binary search serves both (4 instead of 8).
        # Out-of-range corners may alias other keys; `inside` masks them.
        k0 = self._key(corners[:, :4])                                         # the 4 corners with dz = 0
        last = self.keys.numel() - 1
        i0 = torch.searchsorted(self.keys, k0).clamp_max(last)
        f0 = self.keys[i0] == k0
        i1 = (i0 + f0).clamp_max(last)
        f1 = self.keys[i1] == k0 + 1
        idx = torch.cat([i0, i1], 1)
        found = inside & torch.cat([f0, f1], 1)
        w = w * found
        wsum = w.sum(-1, keepdim=True)
        vals = self.attrs[idx].to(w.dtype)                                     # [P, 8, C]
        res = (w[..., None] * vals).sum(1) / wsum.clamp_min(1e-12)
        return torch.where(wsum > 0, res, torch.zeros_like(res)).to(self.attrs.dtype)


def sample_voxel_attributes(coords: torch.Tensor, attrs: torch.Tensor, g: torch.Tensor,
                            chunk: int = 1 << 20) -> torch.Tensor:
    """One-shot `VoxelAttributeField(coords, attrs).sample(g)`; see the module docstring for the exact rule."""
    return VoxelAttributeField(coords, attrs).sample(g, chunk=chunk)


def world_to_grid(points: torch.Tensor, resolution: int, aabb_min: float = -0.5,
                  aabb_size: float = 1.0) -> torch.Tensor:
    """Engine-frame points [P, 3] -> grid coordinates (p - aabb_min) / (aabb_size / resolution) (voxel units)."""
    return (points - aabb_min) * (resolution / aabb_size)
