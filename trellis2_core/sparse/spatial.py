"""Factor-2 space <-> channel rearrangement of sparse voxels: the SC-VAE down/up sampling (SPEC.md section 8).

Child ``s in 0..7`` of parent voxel ``P`` is the voxel ``2P + (s & 1, (s >> 1) & 1, (s >> 2) & 1)``
(x = bit 0, y = bit 1, z = bit 2); the batch column is never scaled.

* ``spatial2channel`` (encoder): fine [Nf, C] -> parents [Np, 8C], parents unique and sorted
  lexicographically by (b, x, y, z); channel block ``s*C:(s+1)*C`` holds child s (zeros if absent).
* ``channel2spatial`` (decoder): parents [Np, 8C'] -> children [Nf, C'], for each parent in row order its kept
  children in ascending s (parent-major, child-ascending); child s takes channel block ``s*C':(s+1)*C'``.
  Which children exist comes either from a boolean mask [Np, 8] (predicted or guided subdivision) or from the
  ``SubdivisionRecord`` a spatial2channel left on its output, which reproduces the encoder's fine voxels in
  their original row order (texturing path, SPEC.md section 16 step 5).

Records chain level by level: the record on a level-l tensor points to the record its fine tensor carried, so a
decoder run on an encoder's latent walks back down to the input voxels. Records hold index tables only (never
neighbour maps), so carrying a latent around does not keep the big fine-level maps alive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from .conv import NEIGHBOUR_CACHE_KEY, PARENT_NEIGHBOURS_KEY
from .tensor import SparseTensor

RECORD_KEY = "channel2spatial_2"  # on a coarse tensor: how to return to the fine voxels it came from
_PLAN_KEY = "spatial2channel_2"  # on a fine tensor: memo of its parents, shared by every S2C of that level


@dataclasses.dataclass(frozen=True, eq=False)
class SubdivisionRecord:
    """How the parents of one spatial2channel map back to its fine voxels.

    fine_coords [Nf, 4] int32: the fine voxels in their original row order.
    parent      [Nf] int64: row of each fine voxel's parent in the coarse tensor.
    child       [Nf] int64: child index s of each fine voxel (x = bit 0, y = bit 1, z = bit 2).
    finer       the record the fine tensor itself carried (one level further down), or None.
    """

    fine_coords: torch.Tensor
    parent: torch.Tensor
    child: torch.Tensor
    finer: SubdivisionRecord | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Subdivision:
    """Children to create from a parent level: fine coords + (parent, child) per fine row, and the cache dict the
    resulting fine SparseTensors share (so h and its skip branch build one neighbour map)."""

    fine_coords: torch.Tensor
    parent: torch.Tensor
    child: torch.Tensor
    cache: dict[str, Any]


def _check_coords(coords: torch.Tensor, what: str) -> list[int]:
    """Per-column max of non-negative coords (one host sync per level)."""
    lo, hi = torch.stack([coords.amin(0), coords.amax(0)]).long().tolist()
    if min(lo) < 0:
        raise InputError(f"{what}: voxel coords must be non-negative; got per-column minimum {lo}")
    return hi


def spatial2channel_plan(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parents of fine voxels.

    coords: [Nf, 4] int32 (b, x, y, z), no duplicate rows.
    returns parent_coords [Np, 4] int32 (unique, lexicographic), parent [Nf] int64, child [Nf] int64.
    """
    device = coords.device
    if coords.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return coords.new_empty(0, 4), empty, empty.clone()
    hi = _check_coords(coords, "spatial2channel")
    c = coords.long()
    p = c.clone()
    p[:, 1:] >>= 1
    child = (c[:, 1] & 1) | ((c[:, 2] & 1) << 1) | ((c[:, 3] & 1) << 2)
    ex, ey, ez = (h // 2 + 1 for h in hi[1:])
    # Flat key is monotone in (b, x, y, z), so torch.unique's sorted order is the lexicographic order.
    key = ((p[:, 0] * ex + p[:, 1]) * ey + p[:, 2]) * ez + p[:, 3]
    ukey, parent = torch.unique(key, sorted=True, return_inverse=True)
    z = ukey % ez
    r = ukey // ez
    y = r % ey
    r = r // ey
    x = r % ex
    b = r // ex
    parent_coords = torch.stack([b, x, y, z], dim=1).to(torch.int32)
    return parent_coords, parent, child


def subdivision_from_mask(x: SparseTensor, mask: torch.Tensor) -> Subdivision:
    """Children of ``x``'s voxels selected by ``mask`` [Np, 8] bool (child s kept iff mask[p, s])."""
    if mask.dtype != torch.bool or mask.shape != (len(x), 8):
        raise InputError(
            f"channel2spatial: subdivision mask must be bool [{len(x)}, 8] (one row per parent voxel); "
            f"got {mask.dtype} {tuple(mask.shape)}. Binarise logits with `logits > 0`."
        )
    nz = mask.nonzero()  # row-major: parent-major, child-ascending
    parent, child = nz[:, 0], nz[:, 1]
    offset = torch.stack([child & 1, (child >> 1) & 1, (child >> 2) & 1], dim=1)
    fine = x.coords[parent].long()
    fine[:, 1:] = fine[:, 1:] * 2 + offset
    return Subdivision(fine.to(torch.int32), parent, child, {})


def subdivision_from_record(x: SparseTensor) -> Subdivision | None:
    """The children a spatial2channel recorded on ``x`` (its exact fine voxels, original order), or None."""
    record = x.get_cache(RECORD_KEY)
    if record is None:
        return None
    cache = {} if record.finer is None else {RECORD_KEY: record.finer}
    return Subdivision(record.fine_coords, record.parent, record.child, cache)


def spatial2channel(x: SparseTensor) -> SparseTensor:
    """Fine [Nf, C] -> parents [Np, 8C]; records on the output how to invert it (see module docstring)."""
    if x.feats.dim() != 2:
        raise InputError(f"spatial2channel: feats must be [N, C]; got {tuple(x.feats.shape)}")
    plan = x.get_cache(_PLAN_KEY)
    if plan is None:
        parent_coords, parent, child = spatial2channel_plan(x.coords)
        record = SubdivisionRecord(x.coords, parent, child, x.get_cache(RECORD_KEY))
        plan = (parent_coords, {RECORD_KEY: record})
        x.set_cache(_PLAN_KEY, plan)
    parent_coords, coarse_cache = plan
    record = coarse_cache[RECORD_KEY]
    n_parent, c = parent_coords.shape[0], x.feats.shape[1]
    feats = x.feats.new_zeros(n_parent * 8, c)
    feats[record.parent * 8 + record.child] = x.feats
    return SparseTensor(feats.reshape(n_parent, 8 * c), parent_coords, cache=coarse_cache)


def channel2spatial(x: SparseTensor, sub: Subdivision) -> SparseTensor:
    """Parents [Np, 8C] -> children [Nf, C] as ``sub`` lists them; child s takes channel block s.

    If the parents' neighbour map exists, the children's cache is told how to derive theirs from it."""
    n, c8 = x.feats.shape
    if c8 % 8 != 0:
        raise InputError(f"channel2spatial: channels must be a multiple of 8; got {c8}")
    feats = x.feats.reshape(n * 8, c8 // 8)[sub.parent * 8 + sub.child]
    return SparseTensor(feats, sub.fine_coords, cache=child_cache(x, sub))


def child_cache(x: SparseTensor, sub: Subdivision) -> dict:
    """The cache the children of ``x`` share (``sub.cache``), told how to derive their neighbour map from x's if x
    has one (for callers that build the children's features themselves, e.g. a chunked decoder)."""
    parent_map = x.get_cache(NEIGHBOUR_CACHE_KEY)
    if parent_map is not None and sub.cache.get(NEIGHBOUR_CACHE_KEY) is None:
        sub.cache.setdefault(PARENT_NEIGHBOURS_KEY, (parent_map, sub.parent, sub.child))
    return sub.cache


class Spatial2Channel(nn.Module):
    """Module form of ``spatial2channel`` (factor 2, no parameters)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return spatial2channel(x)


class Channel2Spatial(nn.Module):
    """Module form of ``channel2spatial`` (factor 2, no parameters).

    forward(x, mask=None): with a bool mask [Np, 8] create exactly the masked children; without one, invert the
    spatial2channel that produced ``x`` (InputError if ``x`` carries no such record).
    """

    def forward(self, x: SparseTensor, mask: torch.Tensor | None = None) -> SparseTensor:
        if mask is not None:
            return channel2spatial(x, subdivision_from_mask(x, mask))
        sub = subdivision_from_record(x)
        if sub is None:
            raise InputError(
                "channel2spatial: no subdivision mask given and the input carries no spatial2channel record; "
                "pass a mask (predicted or guide subdivisions) or decode the latent an encoder returned"
            )
        return channel2spatial(x, sub)
