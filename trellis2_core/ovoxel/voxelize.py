"""Mesh -> flexible dual grid (O-Voxel geometry), vectorised torch (SPEC.md section 10, "Mesh -> O-Voxel").

What the reference's CPU C++ voxeliser computes, restated on tensors:

1. Every grid line parallel to an axis (interior lines only, integer positions 1..R-1 in the two other axes) is
   intersected with every triangle. A hit activates the 4 voxels around the line, sets that axis' edge flag on the one
   whose max corner is the line, and adds the hit point (for the mean) and the triangle's plane quadric to all 4.
2. Face quadrics (``face_weight`` > 0): each active voxel whose box overlaps a triangle (exact triangle/box test) gets
   ``face_weight`` x that triangle's plane quadric. (The reference uses face_weight only as an on/off switch; the
   pipeline's value 1.0 gives the same result.)
3. Boundary quadrics (``boundary_weight`` > 0): edges used by exactly one face add ``boundary_weight`` x the squared
   distance to their line to every active voxel the segment passes through.
4. Regularisation ``regularization_weight * count * |v - mean|^2``; the dual vertex minimises the sum inside the voxel
   box: the unconstrained minimiser if it is inside, else the best of the face-, edge- and corner-constrained minimisers.

Differences from the reference, on purpose: a grid line through a shared edge or vertex is counted exactly once
(top-left fill rule, so closed meshes give closed voxel surfaces), degenerate triangles are skipped (the reference
adds NaN quadrics), quadrics are solved in float64 grid units (identical minimiser for cubic voxels), and rows come
out in lexicographic (x, y, z) order instead of first-touch order (row order only permutes the encoder's rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import InputError
from .flexible_dual_grid import DEFAULT_AABB

__all__ = ["mesh_to_flexible_dual_grid"]

_F64 = torch.float64


def mesh_to_flexible_dual_grid(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    grid_size: int,
    *,
    aabb: Sequence[Sequence[float]] = DEFAULT_AABB,
    face_weight: float = 1.0,
    boundary_weight: float = 0.2,
    regularization_weight: float = 1e-2,
    chunk_size: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxelise a triangle mesh into O-Voxel geometry fields at resolution ``grid_size``.

    Args:
        vertices: [V, 3] float, object space (Z-up), inside ``aabb``.
        faces: [F, 3] integer vertex indices. Winding need not be consistent.
        grid_size: R voxels per axis.
        aabb: ((min x, y, z), (max x, y, z)) of the grid. Default ``[-0.5, 0.5]^3``.
        face_weight, boundary_weight, regularization_weight: QEF weights; defaults are the texturing pipeline's values.
        chunk_size: upper bound on candidate rows processed at once (memory ~ chunk_size x ~200 bytes).

    Returns:
        coords [N, 3] int32 (x, y, z), unique, lexicographic order;
        vertex_offset [N, 3] float32 in [0, 1] voxel units (the encoder input ``dual * R - coords``);
        edge_flags [N, 3] bool.
    """
    R = int(grid_size)
    if isinstance(grid_size, bool) or R != grid_size or R < 2:
        raise InputError(f"grid_size must be an int >= 2 (voxels per axis, e.g. 512); got {grid_size!r}")
    if vertices.dim() != 2 or vertices.shape[1] != 3 or not vertices.dtype.is_floating_point:
        raise InputError(f"vertices must be float [V, 3]; got {tuple(vertices.shape)} {vertices.dtype}")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.dtype.is_floating_point:
        raise InputError(f"faces must be integer [F, 3] vertex indices; got {tuple(faces.shape)} {faces.dtype}")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise InputError(f"faces index vertices out of range [0, {vertices.shape[0]}); got [{int(faces.min())}, {int(faces.max())}]")
    dev = vertices.device
    box = torch.as_tensor(aabb, dtype=_F64, device=dev)
    if box.shape != (2, 3) or bool((box[1] <= box[0]).any()):
        raise InputError(f"aabb must be ((min x, y, z), (max x, y, z)) with min < max; got {aabb!r}")
    g = (vertices.to(_F64) - box[0]) / (box[1] - box[0]) * R  # grid units: voxel (x, y, z) spans [x, x+1]...
    faces = faces.long()
    tri = g[faces]  # [F, 3, 3]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 1])
    length = normal.norm(dim=1, keepdim=True)
    keep = (length[:, 0] > 0) & torch.isfinite(length[:, 0])
    tri, normal = tri[keep], normal[keep] / length[keep]
    plane = torch.cat([normal, -(normal * tri[:, 0]).sum(1, keepdim=True)], dim=1)
    quadric = plane.unsqueeze(2) * plane.unsqueeze(1)  # [F, 4, 4] squared distance to the triangle's plane

    key, point, flag_axis, tri_id = _line_hits(tri, R, chunk_size)  # per hit: 4 voxel keys
    empty3 = torch.zeros(0, 3, device=dev)
    if key.shape[0] == 0:
        return empty3.int(), empty3, empty3.bool()
    keys, inv = torch.unique(key.reshape(-1), return_inverse=True)
    inv = inv.reshape(-1, 4)
    n = keys.shape[0]
    coords = torch.stack([keys // (R * R), keys // R % R, keys % R], dim=1)
    count = torch.bincount(inv.reshape(-1), minlength=n).to(_F64)
    mean = torch.zeros(n, 3, dtype=_F64, device=dev)
    Q = torch.zeros(n, 4, 4, dtype=_F64, device=dev)
    for corner in range(4):
        mean.index_add_(0, inv[:, corner], point)
        Q.index_add_(0, inv[:, corner], quadric[tri_id])
    mean /= count.unsqueeze(1)
    flags = torch.zeros(n, 3, dtype=torch.bool, device=dev)
    flags[inv[:, 0], flag_axis] = True

    if face_weight > 0 and tri.shape[0]:
        vox, t = _face_overlaps(tri, normal, keys, R, chunk_size)
        Q.index_add_(0, vox, face_weight * quadric[t])
    if boundary_weight > 0:
        _add_boundary_quadrics(Q, g, faces, keys, R, boundary_weight, chunk_size)
    if regularization_weight > 0:
        reg = torch.zeros_like(Q)
        reg[:, :3, :3] = torch.eye(3, dtype=_F64, device=dev)
        reg[:, :3, 3] = reg[:, 3, :3] = -mean
        reg[:, 3, 3] = (mean * mean).sum(1)
        Q += (regularization_weight * count).view(-1, 1, 1) * reg
    dual = _solve_qef_in_box(Q, mean, coords.to(_F64))
    return coords.int(), (dual - coords).float().clamp_(0, 1), flags


def _item_ranges(counts: torch.Tensor, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Split items into consecutive ranges [start, stop) of about ``chunk_size`` rows in total (at least one item)."""
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < counts.numel():
        base = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, base + chunk_size, right=True)), start + 1)
        yield start, stop
        start = stop


def _chunks(counts: torch.Tensor, chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Enumerate ``counts[i]`` rows per item i in pieces of about ``chunk_size`` rows: yields (item ids, local index)."""
    for start, stop in _item_ranges(counts, chunk_size):
        c = counts[start:stop]
        if int(c.sum()) == 0:
            continue
        items = torch.repeat_interleave(torch.arange(start, stop, device=counts.device), c)
        local = torch.arange(items.shape[0], device=counts.device) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
        yield items, local


def _edge_fn(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """2D cross(b - a, p - a), evaluated from the lexicographically smaller endpoint so that E(a,b) == -E(b,a) exactly."""
    swap = (a[:, 0] > b[:, 0]) | ((a[:, 0] == b[:, 0]) & (a[:, 1] > b[:, 1]))
    lo, hi = torch.where(swap.unsqueeze(1), b, a), torch.where(swap.unsqueeze(1), a, b)
    e = (hi[:, 0] - lo[:, 0]) * (p[:, 1] - lo[:, 1]) - (hi[:, 1] - lo[:, 1]) * (p[:, 0] - lo[:, 0])
    return torch.where(swap, -e, e)


def _line_hits(tri: torch.Tensor, R: int, chunk_size: int):
    """Hits of interior grid lines with triangles: 4 voxel keys [H, 4] (flagged voxel first), point [H, 3] grid units,
    flagged axis [H], triangle [H]."""
    dev = tri.device
    out_key, out_pt, out_axis, out_tri = [], [], [], []
    for ax2 in range(3):
        ax0, ax1 = (ax2 + 1) % 3, (ax2 + 2) % 3
        p2 = tri[:, :, [ax0, ax1]]  # [F, 3, 2]
        area = (p2[:, 1, 0] - p2[:, 0, 0]) * (p2[:, 2, 1] - p2[:, 0, 1]) - (p2[:, 1, 1] - p2[:, 0, 1]) * (p2[:, 2, 0] - p2[:, 0, 0])
        lo = torch.ceil(p2.amin(1)).clamp(min=1).long()
        hi = torch.floor(p2.amax(1)).clamp(max=R - 1).long()
        span = (hi - lo + 1).clamp(min=0)
        counts = span[:, 0] * span[:, 1] * (area != 0)
        for t, i in _chunks(counts, chunk_size):
            q = torch.stack([lo[t, 0] + i % span[t, 0], lo[t, 1] + i // span[t, 0]], dim=1)  # line (k0, k1)
            pts, qf = p2[t], q.to(_F64)
            s = torch.sign(area[t])
            inside = torch.ones_like(s, dtype=torch.bool)
            w = []
            for j in range(3):  # edge (j+1, j+2) is opposite vertex j
                a, b = pts[:, (j + 1) % 3], pts[:, (j + 2) % 3]
                e = _edge_fn(a, b, qf)
                d = s.unsqueeze(1) * (b - a)  # edge direction with the triangle on its left
                tie_ok = (d[:, 1] > 0) | ((d[:, 1] == 0) & (d[:, 0] > 0))
                inside &= (s * e > 0) | ((e == 0) & tie_ok)
                w.append(e)
            w = torch.stack(w, dim=1)
            z = (w * tri[t][:, :, ax2]).sum(1) / w.sum(1)
            zi = torch.floor(z).long()
            ok = inside & (zi >= 0) & (zi < R)
            q, z, zi, t = q[ok], z[ok], zi[ok], t[ok]
            vox = torch.zeros(q.shape[0], 4, 3, dtype=torch.long, device=dev)
            for c, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
                vox[:, c, ax0], vox[:, c, ax1], vox[:, c, ax2] = q[:, 0] - 1 + dx, q[:, 1] - 1 + dy, zi
            pt = torch.zeros(q.shape[0], 3, dtype=_F64, device=dev)
            pt[:, ax0], pt[:, ax1], pt[:, ax2] = q[:, 0].to(_F64), q[:, 1].to(_F64), z
            out_key.append((vox[..., 0] * R + vox[..., 1]) * R + vox[..., 2])
            out_pt.append(pt)
            out_axis.append(torch.full_like(t, ax2))
            out_tri.append(t)
    if not out_key:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return z.reshape(0, 4), torch.zeros(0, 3, dtype=_F64, device=dev), z, z
    return torch.cat(out_key), torch.cat(out_pt), torch.cat(out_axis), torch.cat(out_tri)


def _lookup(keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each query key in the sorted ``keys`` and whether it is present."""
    pos = torch.searchsorted(keys, query).clamp_(max=keys.shape[0] - 1)
    return pos, keys[pos] == query


def _face_overlaps(tri, normal, keys, R, chunk_size):
    """(active voxel index, triangle index) pairs whose voxel box overlaps the triangle (plane + 3 projection tests)."""
    dev = tri.device
    dom = normal.abs().argmax(1)  # the plane's slope along the dominant axis is <= 1 per unit step of the other two
    a0, a1 = (dom + 1) % 3, (dom + 2) % 3
    ar = torch.arange(tri.shape[0], device=dev)
    lo, hi = torch.floor(tri.amin(1)).long().clamp(0, R - 1), torch.floor(tri.amax(1)).long().clamp(0, R - 1)
    lo0, lo1, lod, hid = lo[ar, a0], lo[ar, a1], lo[ar, dom], hi[ar, dom]
    n0 = hi[ar, a0] - lo0 + 1
    n1 = hi[ar, a1] - lo1 + 1
    # Plane over the dominant-axis projection: coordinate along dom = s0 * u0 + s1 * u1 + s2.
    nd = normal[ar, dom]
    s0, s1 = -normal[ar, a0] / nd, -normal[ar, a1] / nd
    s2 = (normal * tri[:, 0]).sum(1) / nd
    W, D, d1, d2 = _box_test_coeffs(tri, normal)
    vox_out, tri_out = [], []
    # Per column of the projection the plane spans < 3 voxels; 4 candidates per column is a safe cover.
    for t, i in _chunks(n0 * n1 * 4, chunk_size):
        col, k = i // 4, i % 4
        u0 = lo0[t] + col % n0[t]
        u1 = lo1[t] + col // n0[t]
        f0, f1 = u0.to(_F64), u1.to(_F64)
        # lowest point of the plane over the column's unit square [u0, u0+1] x [u1, u1+1]
        zmin = s0[t] * f0 + s1[t] * f1 + s2[t] + s0[t].clamp(max=0) + s1[t].clamp(max=0)
        # ceil - 1: a voxel that only touches the plane from below is a candidate too (the box test keeps touches).
        ud = torch.maximum(torch.ceil(zmin).long() - 1, lod[t]) + k
        c = torch.zeros(t.shape[0], 3, dtype=torch.long, device=dev)
        r = torch.arange(t.shape[0], device=dev)
        c[r, a0[t]], c[r, a1[t]], c[r, dom[t]] = u0, u1, ud
        pos, found = _lookup(keys, (c[:, 0] * R + c[:, 1]) * R + c[:, 2])
        keep = found & (ud <= hid[t])
        c, t, pos = c[keep].to(_F64), t[keep], pos[keep]
        np_ = (normal[t] * c).sum(1)
        ok = ((np_ + d1[t]) * (np_ + d2[t]) <= 0) & ((W[t] @ c.unsqueeze(2)).squeeze(2) + D[t] >= 0).all(1)
        vox_out.append(pos[ok])
        tri_out.append(t[ok])
    if not vox_out:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e
    return torch.cat(vox_out), torch.cat(tri_out)


def _box_test_coeffs(tri: torch.Tensor, n: torch.Tensor):
    """Per-triangle constants of the triangle / unit-box overlap test (Schwarz-Seidel), for box min corner p:
    plane test ``(n.p + d1)(n.p + d2) <= 0`` and 9 projected edge tests ``W p + D >= 0`` (W [F, 9, 3], D [F, 9])."""
    crit = (n > 0).to(_F64)
    d1 = (n * (crit - tri[:, 0])).sum(1)
    d2 = (n * ((1 - crit) - tri[:, 0])).sum(1)
    W = torch.zeros(tri.shape[0], 9, 3, dtype=_F64, device=tri.device)
    D = torch.zeros(tri.shape[0], 9, dtype=_F64, device=tri.device)
    for pi, (u, v, w) in enumerate(((0, 1, 2), (1, 2, 0), (2, 0, 1))):  # projections xy, yz, zx along w
        mul = torch.where(n[:, w] < 0, -1.0, 1.0).to(_F64)
        for j in range(3):
            a, e = tri[:, j], tri[:, (j + 1) % 3] - tri[:, j]
            ne_u, ne_v = -mul * e[:, v], mul * e[:, u]
            row = 3 * pi + j
            W[:, row, u], W[:, row, v] = ne_u, ne_v
            D[:, row] = -(ne_u * a[:, u] + ne_v * a[:, v]) + ne_u.clamp(min=0) + ne_v.clamp(min=0)
    return W, D, d1, d2


def _add_boundary_quadrics(Q, g, faces, keys, R, weight, chunk_size):
    """Edges used by one face: add weight x (squared distance to the edge's line) to active voxels the segment crosses."""
    dev = g.device
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    edges, uses = torch.unique(e, dim=0, return_counts=True)
    edges = edges[uses == 1]
    p0, p1 = g[edges[:, 0]], g[edges[:, 1]]
    seg = p1 - p0
    length = seg.norm(dim=1)
    keep = length > 1e-6 * R  # the reference skips segments shorter than 1e-6 world units
    p0, seg, length = p0[keep], seg[keep], length[keep]
    if p0.shape[0] == 0:
        return
    d = seg / length.unsqueeze(1)
    A = torch.eye(3, dtype=_F64, device=dev) - d.unsqueeze(2) * d.unsqueeze(1)
    b = -(A @ p0.unsqueeze(2)).squeeze(2)
    q = torch.zeros(p0.shape[0], 4, 4, dtype=_F64, device=dev)
    q[:, :3, :3], q[:, :3, 3], q[:, 3, :3] = A, b, b
    q[:, 3, 3] = (p0 * (A @ p0.unsqueeze(2)).squeeze(2)).sum(1)
    # Pieces between consecutive crossings of integer planes; each piece's midpoint names one traversed voxel.
    v0, v1 = torch.floor(p0).long(), torch.floor(p0 + seg).long()
    crossings = (v1 - v0).abs()  # [S, 3]
    for start, stop in _item_ranges(crossings.sum(1) + 1, chunk_size):
        ids = torch.arange(start, stop, device=dev)
        tlist, owner = [torch.zeros(ids.shape[0], dtype=_F64, device=dev)], [ids]  # every segment starts at t = 0
        for ax in range(3):
            nax = crossings[ids, ax]
            o = torch.repeat_interleave(ids, nax)
            j = torch.arange(o.shape[0], device=dev) - torch.repeat_interleave(torch.cumsum(nax, 0) - nax, nax)
            step = torch.sign(seg[o, ax]).long()
            plane = (v0[o, ax] + (step > 0).long() + j * step).to(_F64)
            tlist.append((plane - p0[o, ax]) / seg[o, ax])
            owner.append(o)
        t, own = torch.cat(tlist).clamp(0, 1), torch.cat(owner)
        order = torch.argsort(own.to(_F64) * 4 + t)  # by segment, then by t
        t, own = t[order], own[order]
        last = torch.cat([own[1:] != own[:-1], own.new_ones(1, dtype=torch.bool)])
        nxt = torch.where(last, torch.ones_like(t), torch.cat([t[1:], t.new_ones(1)]))
        vox = torch.floor(p0[own] + ((t + nxt) / 2).unsqueeze(1) * seg[own]).long()
        inside = ((vox >= 0) & (vox < R)).all(1)
        pos, found = _lookup(keys, (vox[:, 0] * R + vox[:, 1]) * R + vox[:, 2])
        found &= inside
        Q.index_add_(0, pos[found], weight * q[own[found]])


def _solve_qef_in_box(Q: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """argmin p^T Q p (p = [v, 1]) over the box [lo, lo + 1]: free minimiser if inside, else best constrained one."""
    A, b = Q[:, :3, :3], -Q[:, :3, 3]
    L, info = torch.linalg.cholesky_ex(A)  # positive definite whenever the regulariser is on (the pipeline's case)
    v = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2)
    singular = (info != 0) | ~torch.isfinite(v).all(1)
    if bool(singular.any()):
        # Minimiser nearest the mean (pseudo-inverse): flat or straight regions without a regulariser.
        As, ms = A[singular], mean[singular]
        evals, evecs = torch.linalg.eigh(As)
        inv = torch.where(evals > 1e-9 * evals[:, 2:].clamp(min=1e-30), 1 / evals, torch.zeros_like(evals))
        r = b[singular] - (As @ ms.unsqueeze(2)).squeeze(2)
        v[singular] = ms + (evecs @ (inv * (evecs.transpose(1, 2) @ r.unsqueeze(2)).squeeze(2)).unsqueeze(2)).squeeze(2)
    hi = lo + 1
    out = ((v >= lo) & (v <= hi)).all(1).logical_not()
    if not bool(out.any()):
        return v
    Qo, lo_o, hi_o = Q[out], lo[out], hi[out]
    m = Qo.shape[0]
    cands = []
    for a in range(3):  # one coordinate on a box face, the other two free (2x2 solve)
        a1, a2 = (a + 1) % 3, (a + 2) % 3
        M = Qo[:, [a1, a2]][:, :, [a1, a2]]
        det = M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] * M[:, 1, 0]
        for bound in (lo_o[:, a], hi_o[:, a]):
            rhs = -(Qo[:, [a1, a2], a] * bound.unsqueeze(1) + Qo[:, [a1, a2], 3])
            safe = torch.where(det.abs() > 1e-12, det, torch.ones_like(det))
            x1 = (M[:, 1, 1] * rhs[:, 0] - M[:, 0, 1] * rhs[:, 1]) / safe
            x2 = (M[:, 0, 0] * rhs[:, 1] - M[:, 1, 0] * rhs[:, 0]) / safe
            p = torch.zeros(m, 3, dtype=_F64, device=Q.device)
            p[:, a], p[:, a1], p[:, a2] = bound, x1, x2
            cands.append((p, det.abs() > 1e-12))
    for a in range(3):  # one coordinate free along a box edge
        a1, a2 = (a + 1) % 3, (a + 2) % 3
        for b1 in (lo_o[:, a1], hi_o[:, a1]):
            for b2 in (lo_o[:, a2], hi_o[:, a2]):
                qa = Qo[:, a, a]
                x = -(Qo[:, a, a1] * b1 + Qo[:, a, a2] * b2 + Qo[:, a, 3]) / torch.where(qa > 0, qa, torch.ones_like(qa))
                p = torch.zeros(m, 3, dtype=_F64, device=Q.device)
                p[:, a], p[:, a1], p[:, a2] = x, b1, b2
                cands.append((p, qa > 0))
    for corner in range(8):
        sel = torch.tensor([corner >> k & 1 for k in range(3)], dtype=torch.bool, device=Q.device)
        cands.append((torch.where(sel, hi_o, lo_o), torch.ones(m, dtype=torch.bool, device=Q.device)))
    P = torch.stack([c[0] for c in cands], 1)  # [m, K, 3]
    valid = torch.stack([c[1] for c in cands], 1) & ((P >= lo_o.unsqueeze(1) - 1e-9) & (P <= hi_o.unsqueeze(1) + 1e-9)).all(2)
    P4 = torch.cat([P, torch.ones_like(P[..., :1])], dim=2)
    err = torch.einsum("mki,mij,mkj->mk", P4, Qo, P4)
    err = torch.where(valid, err, torch.full_like(err, float("inf")))
    best = P[torch.arange(m, device=Q.device), err.argmin(1)]
    v = v.clone()
    v[out] = best
    return v
