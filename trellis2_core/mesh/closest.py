"""Closest points on a reference triangle mesh (the baker projects texels onto the high-resolution surface).

The reference does this with a GPU BVH (SPEC 15 step 4). Here: a k-d tree over triangle centroids (scipy) proposes
the k nearest triangles per query, and the exact point-triangle closest point (Ericson, Real-Time Collision Detection
5.1.5, vectorised over all candidates) picks the best. With k = 8 on a dense reference (triangles much smaller than
the query-surface distance) this finds the true closest point except on pathological inputs (a huge triangle next to
tiny ones), where it returns a nearby surface point instead. CPU (scipy) for the search, torch for the geometry.
"""

from __future__ import annotations

import numpy as np
import torch


class ClosestPointQuery:
    """Prepared reference surface: vertices [V, 3] float32, faces [F, 3] int64 (any device; queries come back there)."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, k: int = 8):
        from scipy.spatial import cKDTree

        self.tri = vertices[faces].to(torch.float32)                      # [F, 3, 3]
        cen = self.tri.mean(1).detach().cpu().numpy().astype(np.float64)
        self.tree = cKDTree(cen)
        self.k = int(min(k, len(cen)))

    def query(self, points: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
        """Closest surface points [P, 3] for query points [P, 3] (float32)."""
        out = torch.empty_like(points, dtype=torch.float32)
        for s in range(0, points.shape[0], chunk):
            p = points[s:s + chunk].to(torch.float32)
            _, idx = self.tree.query(p.detach().cpu().numpy().astype(np.float64), k=self.k, workers=-1)
            idx = torch.as_tensor(np.asarray(idx).reshape(len(p), self.k), device=self.tri.device)
            cand = closest_on_triangles(p[:, None, :].expand(-1, self.k, -1), self.tri[idx])  # [P, k, 3]
            d = ((cand - p[:, None, :]) ** 2).sum(-1)
            best = d.argmin(1)
            out[s:s + chunk] = cand[torch.arange(len(p), device=p.device), best]
        return out


def closest_on_triangles(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Closest point to p [..., 3] on triangle tri [..., 3, 3] (exact, handles vertex/edge/face regions)."""
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    ab, ac, ap = b - a, c - a, p - a
    dot = lambda x, y: (x * y).sum(-1)  # noqa: E731
    d1, d2 = dot(ab, ap), dot(ac, ap)
    bp, cp = p - b, p - c
    d3, d4 = dot(ab, bp), dot(ac, bp)
    d5, d6 = dot(ab, cp), dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = torch.finfo(p.dtype).tiny
    # default: interior of the face
    denom = (va + vb + vc)
    denom = torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    v = vb / denom
    w = vc / denom
    res = a + ab * v[..., None] + ac * w[..., None]
    # Ericson's early returns in reverse order (a later torch.where wins): BC, AC, C, AB, B, A
    cond_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6)).clamp_min(eps)
    res = torch.where(cond_bc[..., None], b + (c - b) * t_bc[..., None], res)
    cond_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t_ac = d2 / (d2 - d6).clamp_min(eps)
    res = torch.where(cond_ac[..., None], a + ac * t_ac[..., None], res)
    res = torch.where(((d6 >= 0) & (d5 <= d6))[..., None], c, res)
    cond_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t_ab = d1 / (d1 - d3).clamp_min(eps)
    res = torch.where(cond_ab[..., None], a + ab * t_ab[..., None], res)
    res = torch.where(((d3 >= 0) & (d4 <= d3))[..., None], b, res)
    res = torch.where(((d1 <= 0) & (d2 <= 0))[..., None], a, res)
    return res
