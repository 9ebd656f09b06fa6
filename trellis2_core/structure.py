"""From sparse-structure decoder logits to the occupied voxel coordinates stage 2 runs on (SPEC.md section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def occupancy_coords(logits: torch.Tensor, resolution: int) -> torch.Tensor:
    """Occupied voxels of the decoded sparse structure.

    logits:     ``[B, 1, D, D, D]`` float (the SS decoder output; D = 64 for the released decoder).
    resolution: the requested structure resolution r, a divisor of D (the pipeline uses 32 or 64).
    Returns ``coords [N, 4]`` int32 ``(b, x, y, z)`` on the logits' device, in ``argwhere`` (lexicographic)
    order, which fixes how the stage-2 noise rows are assigned (SPEC 2).

    ``occ = logits > 0``; if r < D each r-voxel is the logical OR of its ``(D/r)^3`` children
    (the reference's ``max_pool3d(occ.float(), D/r) > 0.5``).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 5 or logits.shape[1] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"logits: expected a [B, 1, D, D, D] tensor from the sparse-structure decoder; got {got}")
    d = logits.shape[-1]
    if logits.shape[-3:] != (d, d, d):
        raise InputError(f"logits: expected a cubic grid [B, 1, D, D, D]; got {tuple(logits.shape)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or d % resolution:
        raise InputError(
            f"resolution: expected a positive divisor of the decoded grid size {d} (e.g. {d} or {d // 2}); "
            f"got {resolution!r}"
        )
    occ = logits > 0
    if resolution < d:
        k = d // resolution
        occ = F.max_pool3d(occ.float(), k, k, 0) > 0.5
    return torch.argwhere(occ)[:, [0, 2, 3, 4]].int()


__all__ = ["occupancy_coords"]
