"""Flexible dual grid: O-Voxel geometry fields -> triangle mesh (SPEC.md section 10), and the decoder head (section 9).

Frame: voxel ``(x, y, z)`` of a grid of ``R`` voxels per axis spans ``[x, x+1] x [y, y+1] x [z, z+1]`` in voxel units; a
voxel-unit position ``v`` maps to object space as ``p = v * (aabb_max - aabb_min) / R + aabb_min``, which for the default
aabb ``[-0.5, 0.5]^3`` is ``p = v / R - 0.5`` (Z-up, the reference convention).

Edge flag ``a`` of voxel ``c`` says the surface crosses the primal grid edge parallel to axis ``a`` that runs through the
voxel's max corner in the two other axes. The four voxels around that edge form one quad of the output mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["flexible_dual_grid_to_mesh", "fdg_head", "DEFAULT_AABB"]

DEFAULT_AABB = ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5))

# The 4 voxels around the flagged edge of voxel c, per axis, in the reference's quad vertex order.
_EDGE_NEIGHBOUR_OFFSETS = (
    ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)),  # x-edge
    ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)),  # y-edge
    ((0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)),  # z-edge
)
# Quad (q0, q1, q2, q3) -> two triangles: split along the q0-q2 diagonal, or along q1-q3.
_SPLIT_02 = (0, 1, 2, 0, 2, 3)
_SPLIT_13 = (0, 1, 3, 3, 1, 2)


def fdg_head(raw: torch.Tensor, voxel_margin: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FlexiDualGridVaeDecoder head: raw 7-channel decoder output -> (vertex_offset, edge_flags, split_weight).

    raw [N, 7] float: 3 vertex-offset logits, 3 edge-intersection logits, 1 split-weight logit.
    Returns vertex_offset [N, 3] in voxel units, in ``(-m, 1 + m)`` with ``m = voxel_margin``
    (``(1 + 2m) * sigmoid - m``); edge_flags [N, 3] bool (logit > 0); split_weight [N, 1] (softplus, > 0).
    """
    if raw.dim() != 2 or raw.shape[1] != 7:
        raise InputError(
            f"fdg_head: raw must be the decoder's [N, 7] output; got shape {tuple(raw.shape)}. "
            "Pass the shape decoder's output feats (3 offset, 3 flag, 1 split logit)."
        )
    offset = (1 + 2 * voxel_margin) * torch.sigmoid(raw[:, 0:3]) - voxel_margin
    flags = raw[:, 3:6] > 0
    split = F.softplus(raw[:, 6:7])
    return offset, flags, split


def _grid_dims(grid_size: int | Sequence[int]) -> tuple[int, int, int]:
    dims = (grid_size,) * 3 if isinstance(grid_size, int) else tuple(int(g) for g in grid_size)
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise InputError(
            f"grid_size must be a positive int R or three positive ints; got {grid_size!r}. Use the O-Voxel resolution, e.g. 512."
        )
    return dims  # type: ignore[return-value]


def _check_inputs(coords, vertex_offset, edge_flags, split_weight) -> int:
    if coords.dim() != 2 or coords.shape[1] != 3 or coords.dtype.is_floating_point:
        raise InputError(
            f"coords must be an integer tensor [N, 3] (x, y, z); got {tuple(coords.shape)} {coords.dtype}. "
            "Drop the batch column of SparseTensor coords with coords[:, 1:]."
        )
    n = coords.shape[0]
    if vertex_offset.shape != (n, 3) or not vertex_offset.dtype.is_floating_point:
        raise InputError(f"vertex_offset must be float [N, 3] with N = {n}; got {tuple(vertex_offset.shape)} {vertex_offset.dtype}")
    if edge_flags.shape != (n, 3) or edge_flags.dtype != torch.bool:
        raise InputError(
            f"edge_flags must be bool [N, 3] with N = {n}; got {tuple(edge_flags.shape)} {edge_flags.dtype}. "
            "Threshold logits with `> 0`."
        )
    if split_weight is not None and split_weight.shape not in ((n, 1), (n,)):
        raise InputError(f"split_weight must be [N, 1] (or [N]) with N = {n}, or None; got {tuple(split_weight.shape)}")
    return n


def flexible_dual_grid_to_mesh(
    coords: torch.Tensor,
    vertex_offset: torch.Tensor,
    edge_flags: torch.Tensor,
    split_weight: torch.Tensor | None,
    grid_size: int | Sequence[int],
    aabb: Sequence[Sequence[float]] = DEFAULT_AABB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the triangle mesh of a flexible dual grid (the reference's inference branch, ``train=False``).

    Args:
        coords: [N, 3] integer voxel coords (x, y, z), unique, each in ``[0, R)``.
        vertex_offset: [N, 3] float, dual vertex inside its voxel in voxel units (data: [0, 1]; decoder: (-0.5, 1.5)).
        edge_flags: [N, 3] bool, surface crosses the voxel's x/y/z max-corner edge.
        split_weight: [N, 1] float (> 0) or None. A quad ``(q0, q1, q2, q3)`` is cut along ``q0-q2`` iff
            ``w[q0] * w[q2] > w[q1] * w[q3]``. None: the cut whose two triangle normals are more aligned
            (``|n0 . n1|`` larger, area-weighted normals; ties cut along ``q1-q3``). This is SPEC 10's stated rule; the
            reference's code indexes the second triangle wrongly and in effect always cuts along ``q0-q2``. The
            pipeline never takes this branch (the decoder always gives weights).
        grid_size: R, or (Rx, Ry, Rz).
        aabb: ((min x, y, z), (max x, y, z)) of the grid in object space.

    Returns:
        vertices [N, 3] float32, one per voxel in input order (unreferenced ones included):
            ``(coords + offset) * (aabb_max - aabb_min) / R + aabb_min``.
        faces [F, 3] int64, two triangles per quad, quads in row-major (voxel, axis) order of the flags; a quad is
            kept only if all four voxels exist (neighbours outside ``[0, R)`` are missing). Winding is not consistent.
    """
    n = _check_inputs(coords, vertex_offset, edge_flags, split_weight)
    dims = _grid_dims(grid_size)
    device = coords.device
    aabb_t = torch.as_tensor(aabb, dtype=torch.float32, device=device)
    if aabb_t.shape != (2, 3):
        raise InputError(f"aabb must be ((min x, y, z), (max x, y, z)); got shape {tuple(aabb_t.shape)}")
    # Same float32 arithmetic as the reference: voxel_size = extent / R, then v * voxel_size + min.
    voxel_size = (aabb_t[1] - aabb_t[0]) / torch.tensor(dims, dtype=torch.int32, device=device)
    vertices = (coords.float() + vertex_offset.float()) * voxel_size + aabb_t[0]
    if n == 0:
        return vertices.reshape(0, 3), torch.zeros((0, 3), dtype=torch.int64, device=device)

    c = coords.long()
    hi = torch.tensor(dims, dtype=torch.int64, device=device)
    if bool(((c < 0) | (c >= hi)).any()):
        raise InputError(
            f"coords must lie in [0, grid_size) = [0, {dims}); got min {c.min(0).values.tolist()}, max {c.max(0).values.tolist()}. "
            "Pass the grid resolution the voxels were made at."
        )
    # Exact voxel lookup: sort the flattened keys once, then binary-search every neighbour (O(M log N), no hash map).
    keys = (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]
    sorted_keys, perm = torch.sort(keys)
    if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise InputError("coords must be unique: the same voxel appears twice. Deduplicate with torch.unique(coords, dim=0).")

    voxel, axis = edge_flags.nonzero(as_tuple=True)  # row-major (voxel, axis) order, as the reference's mask indexing
    offsets = torch.tensor(_EDGE_NEIGHBOUR_OFFSETS, dtype=torch.int64, device=device)  # [3 axes, 4, 3]
    # Offsets are 0/1, so a quad leaves the grid iff its voxel + the per-axis max offset does; drop those first.
    in_grid = (c[voxel] + offsets.amax(dim=1)[axis] < hi).all(dim=1)
    voxel, axis = voxel[in_grid], axis[in_grid]
    # Neighbour key = voxel key + key of the offset (linear), [M, 4] int64 instead of [M, 4, 3] coordinates.
    key_delta = (offsets[..., 0] * dims[1] + offsets[..., 1]) * dims[2] + offsets[..., 2]  # [3, 4]
    nb_keys = keys[voxel].unsqueeze(1) + key_delta[axis]
    pos = torch.searchsorted(sorted_keys, nb_keys).clamp_(max=n - 1)
    found = sorted_keys[pos] == nb_keys
    quads = perm[pos[found.all(dim=1)]]  # [L, 4] voxel indices

    split_02 = torch.tensor(_SPLIT_02, dtype=torch.int64, device=device)
    split_13 = torch.tensor(_SPLIT_13, dtype=torch.int64, device=device)
    tri_02, tri_13 = quads[:, split_02], quads[:, split_13]  # [L, 6]
    if split_weight is not None:
        w = split_weight.reshape(n)[quads]  # [L, 4]
        use_02 = w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]
    else:
        use_02 = _normal_alignment(vertices, tri_02) > _normal_alignment(vertices, tri_13)
    faces = torch.where(use_02.unsqueeze(1), tri_02, tri_13).reshape(-1, 3)
    return vertices, faces


def _normal_alignment(vertices: torch.Tensor, tris: torch.Tensor) -> torch.Tensor:
    """|n0 . n1| of the two triangles of each split [L, 6] (area-weighted normals)."""
    p = vertices[tris.reshape(-1, 2, 3)]  # [L, 2, 3 corners, 3]
    n = torch.linalg.cross(p[:, :, 1] - p[:, :, 0], p[:, :, 2] - p[:, :, 0])  # [L, 2, 3]
    return (n[:, 0] * n[:, 1]).sum(dim=1).abs()
