"""Rasterise triangles in UV space (vectorised torch, any device, chunked to bound memory). No rasteriser library.

A texel (row i, column j) of an H x W texture is covered by a triangle if its centre ((j + 0.5) / W, (i + 0.5) / H) in
glTF UV space (see mesh.py) lies inside the triangle's UV image (edges inclusive, a tiny tolerance so shared edges
leave no cracks). Where triangles overlap the highest face index wins (scatter amax: deterministic on every device).
Candidates are the texels of each triangle's bounding box, generated in chunks of at most `chunk` candidates, so
memory is O(chunk + H W) whatever the triangle sizes.
"""

from __future__ import annotations

import torch


def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, height: int, width: int, chunk: int = 1 << 21):
    """Cover an H x W texture with the UV triangles.

    uvs [V, 2] float in [0, 1], faces [F, 3] int64 -> (face [H*W] int64 (-1 = no triangle), bary [H*W, 3] float32
    barycentric weights of the face's 3 vertices at the texel centre, zeros where face == -1). Row-major texels.
    """
    device = uvs.device
    px = uvs.to(torch.float64) * torch.tensor([width, height], dtype=torch.float64, device=device)
    tri = px[faces]                                                      # [F, 3, 2] texel units
    lo = torch.ceil(tri.min(1).values - 0.5).clamp_min(0).to(torch.int64)  # first texel whose centre is >= min
    hi = torch.floor(tri.max(1).values - 0.5).to(torch.int64)
    hi[:, 0].clamp_(max=width - 1)
    hi[:, 1].clamp_(max=height - 1)
    span = (hi - lo + 1).clamp_min(0)
    count = span[:, 0] * span[:, 1]                                      # candidate texels per face
    owner = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    ends = torch.cumsum(count, 0)
    start_face = 0
    nf = faces.shape[0]
    while start_face < nf:
        base = int(ends[start_face - 1]) if start_face else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + chunk, device=device), right=True))
        stop = max(stop, start_face + 1)
        if stop == start_face + 1 and int(count[start_face]) > chunk:
            _cover_big(owner, tri, lo, span, start_face, width, chunk)
        else:
            _cover(owner, tri, lo, span, count, start_face, stop, width)
        start_face = stop
    face = owner
    hit = face >= 0
    bary = torch.zeros(height * width, 3, dtype=torch.float32, device=device)
    if hit.any():
        idx = torch.nonzero(hit).squeeze(1)
        centre = torch.stack([idx % width, idx // width], 1).to(torch.float64) + 0.5
        bary[idx] = _barycentric(tri[face[idx]], centre).clamp_min(0).to(torch.float32)
        bary[idx] /= bary[idx].sum(1, keepdim=True).clamp_min(1e-12)
    return face, bary


def _barycentric(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates [N, 3] of 2D points p [N, 2] in triangles t [N, 3, 2] (float64)."""
    a, b, c = t[:, 0], t[:, 1], t[:, 2]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = torch.where(den.abs() > 1e-30, den, torch.full_like(den, float("inf")))  # UV-degenerate: never inside
    w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
    w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
    return torch.stack([1 - w1 - w2, w1, w2], 1)


def _scatter(owner, tri, fid, tx, ty, width):
    centre = torch.stack([tx, ty], 1).to(torch.float64) + 0.5
    w = _barycentric(tri[fid], centre)
    inside = (w >= -1e-7).all(1) & torch.isfinite(w).all(1)
    owner.scatter_reduce_(0, (ty * width + tx)[inside], fid[inside], reduce="amax")


def _cover(owner, tri, lo, span, count, f0, f1, width):
    """All candidate texels of faces [f0, f1) at once."""
    cnt = count[f0:f1]
    total = int(cnt.sum())
    if total == 0:
        return
    fid = torch.repeat_interleave(torch.arange(f0, f1, device=owner.device), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    k = torch.arange(total, device=owner.device) - first[fid - f0]
    w = span[fid, 0]
    _scatter(owner, tri, fid, lo[fid, 0] + k % w, lo[fid, 1] + k // w, width)


def _cover_big(owner, tri, lo, span, f, width, chunk):
    """One face whose bounding box alone exceeds the chunk: walk it in bands of rows."""
    w, h = int(span[f, 0]), int(span[f, 1])
    rows = max(chunk // max(w, 1), 1)
    for r0 in range(0, h, rows):
        n = min(rows, h - r0) * w
        k = torch.arange(n, device=owner.device)
        fid = torch.full((n,), f, dtype=torch.int64, device=owner.device)
        _scatter(owner, tri, fid, lo[f, 0] + k % w, lo[f, 1] + r0 + k // w, width)
