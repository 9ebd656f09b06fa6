"""Tangent frames (glTF TANGENT, MikkTSpace-style) and the tangent-space normal-map bake from a high-res surface.

Conventions (glTF 2.0, what every viewer decodes):
* TANGENT [V, 4]: xyz unit, orthogonal to the vertex normal, pointing towards increasing u; w = +-1 the handedness.
  The bitangent a viewer builds is B = w * cross(N, T) and must point "up" in the image, i.e. towards DEcreasing
  glTF v (v grows downwards, see mesh.py), so B is the direction of -dP/dv. Charts that xatlas lays out mirrored get
  w = -1, the others +1.
* Normal texture: linear RGB = n_tangent * 0.5 + 0.5 with n_tangent = (n.T, n.B, n.N): +X right (u), +Y up (green,
  the OpenGL convention glTF uses), +Z out of the surface.

Per-vertex tangents follow MikkTSpace's recipe in simplified form: per face, T = dP/du and B = -dP/dv from the UV
derivatives, both unit; each corner adds them weighted by its corner angle to its vertex; at the vertex, T is
Gram-Schmidt-orthogonalised against the vertex normal and w = sign(dot(cross(N, T), B_sum)). Vertices are split along
UV seams, so a mirrored chart never shares a vertex with an unmirrored one.
Per texel, the frame is interpolated from the low-res vertex tangents and normals with the texel's barycentrics and
orthonormalised (N normalised, T Gram-Schmidt, B = w cross(N, T)): the per-pixel frame a MikkTSpace viewer builds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .closest import ClosestPointQuery, closest_on_triangles
from .mesh import Mesh, vertex_normals

FLAT = (0.0, 0.0, 1.0)  # the tangent-space normal of a texel whose surface matches the low-res one


def vertex_tangents(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor,
                    normals: torch.Tensor) -> torch.Tensor:
    """[V, 4] float32 glTF tangents (module docstring) for vertices [V, 3], faces [F, 3] int64, uvs [V, 2] (glTF
    convention) and unit normals [V, 3]. Vertices without any UV-valid face get an arbitrary tangent orthogonal to
    their normal and w = +1 (no texel can land on them)."""
    if uvs is None or normals is None:
        raise InputError("vertex_tangents: needs uvs and normals; unwrap the mesh first (trellis2_core.mesh.uv.unwrap)")
    v = vertices.to(torch.float64)
    uv = uvs.to(torch.float64)
    n = normals.to(torch.float64)
    tri, tuv = v[faces], uv[faces]                                     # [F, 3, 3], [F, 3, 2]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    d1, d2 = tuv[:, 1] - tuv[:, 0], tuv[:, 2] - tuv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = det.abs() > 1e-20                                             # UV-degenerate faces contribute nothing
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))[:, None]
    t_f = F.normalize((d2[:, 1:2] * e1 - d1[:, 1:2] * e2) * inv, dim=1)          # dP/du
    b_f = F.normalize(-(d1[:, 0:1] * e2 - d2[:, 0:1] * e1) * inv, dim=1)         # -dP/dv: "up" in the image
    # corner angles as weights (MikkTSpace), so the result does not depend on how a fan is triangulated
    ang = []
    for k in range(3):
        a = F.normalize(tri[:, (k + 1) % 3] - tri[:, k], dim=1)
        b = F.normalize(tri[:, (k + 2) % 3] - tri[:, k], dim=1)
        ang.append(torch.acos((a * b).sum(1).clamp(-1, 1)))
    wgt = torch.stack(ang, 1) * ok[:, None]                            # [F, 3]
    idx = faces.reshape(-1)
    t_acc = torch.zeros_like(v).index_add_(0, idx, (t_f[:, None] * wgt[..., None]).reshape(-1, 3))
    b_acc = torch.zeros_like(v).index_add_(0, idx, (b_f[:, None] * wgt[..., None]).reshape(-1, 3))
    t = t_acc - n * (n * t_acc).sum(1, keepdim=True)
    # fallback for vertices with no usable tangent: any unit vector orthogonal to n
    axis = torch.where((n[:, 0].abs() < 0.9)[:, None], n.new_tensor([1.0, 0, 0]), n.new_tensor([0, 1.0, 0]))
    alt = torch.linalg.cross(n, axis)
    t = torch.where((t.norm(dim=1) > 1e-12)[:, None], t, alt)
    t = F.normalize(t, dim=1)
    w = torch.where((torch.linalg.cross(n, t) * b_acc).sum(1) < 0, -1.0, 1.0)
    return torch.cat([t, w[:, None]], 1).to(torch.float32).contiguous()


def with_tangents(mesh: Mesh) -> Mesh:
    """`mesh` with normals (area-weighted if it had none) and glTF tangents; needs uvs."""
    if not isinstance(mesh, Mesh) or mesh.uvs is None:
        raise InputError("mesh: tangents need a Mesh with uvs; unwrap it first (trellis2_core.mesh.uv.unwrap)")
    normals = mesh.normals if mesh.normals is not None else vertex_normals(mesh.vertices, mesh.faces)
    return mesh.replace(normals=normals, tangents=vertex_tangents(mesh.vertices, mesh.faces, mesh.uvs, normals))


def texel_frames(mesh: Mesh, tface: torch.Tensor, tbary: torch.Tensor):
    """Per-texel orthonormal frames (t, b, n), each [C, 3] float32, at faces tface [C] with barycentrics tbary [C, 3].

    mesh needs normals and tangents (with_tangents). n = normalised interpolated normal, t = interpolated tangent
    Gram-Schmidt against n, b = w * cross(n, t) with w the face's handedness (one per chart).
    """
    fidx = mesh.faces[tface]                                           # [C, 3]
    bw = tbary[:, :, None]
    n = F.normalize((mesh.normals[fidx] * bw).sum(1), dim=1)
    tan = mesh.tangents[fidx]                                          # [C, 3, 4]
    t = (tan[..., :3] * bw).sum(1)
    t = F.normalize(t - n * (n * t).sum(1, keepdim=True), dim=1)
    w = torch.where((tan[..., 3] * tbary).sum(1) < 0, -1.0, 1.0)[:, None]
    return t, w * torch.linalg.cross(n, t), n


def encode_tangent_space(world: torch.Tensor, t: torch.Tensor, b: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """World-space unit normals [C, 3] -> normal-texture values [C, 3] in [0, 1] (RGB = n_tangent * 0.5 + 0.5).

    A reference normal facing away from the low-res surface is flipped first: the decoded TRELLIS surface has
    arbitrary winding unless repaired, and where the closest point lands on the far side of a thin sheet the flipped
    normal is the near side's. Only the low-res normals decide which side is out (a viewer shows nothing else).
    """
    world = torch.where(((world * n).sum(1) < 0)[:, None], -world, world)
    local = torch.stack([(world * t).sum(1), (world * b).sum(1), (world * n).sum(1)], 1)
    local = F.normalize(local, dim=1)
    local = torch.where(local.norm(dim=1, keepdim=True) > 0.5, local, local.new_tensor(FLAT))
    return local * 0.5 + 0.5


def renormalize_encoded(img: torch.Tensor) -> torch.Tensor:
    """[..., 3] encoded normals in [0, 1] (e.g. averaged by seam filling) -> unit normals, re-encoded."""
    n = F.normalize(img * 2 - 1, dim=-1)
    return torch.where(n.norm(dim=-1, keepdim=True) > 0.5, n, n.new_tensor(FLAT)) * 0.5 + 0.5


class SurfaceNormalQuery:
    """Closest points on a reference surface together with its interpolated vertex normals there.

    Same candidate search and exact closest point as ClosestPointQuery.query (so the points are identical), plus the
    winning triangle, whose vertex normals (the reference's own, or area-weighted ones) are blended with the closest
    point's barycentrics.
    """

    def __init__(self, query: ClosestPointQuery, reference: Mesh):
        self.query = query
        ref_n = reference.normals if reference.normals is not None else vertex_normals(reference.vertices,
                                                                                       reference.faces)
        self.nrm = ref_n.to(query.tri.device, torch.float32)[reference.faces.to(query.tri.device)]  # [F, 3, 3]

    def project(self, points: torch.Tensor, chunk: int = 1 << 18):
        """points [P, 3] -> (closest points [P, 3] float32, unit reference normals there [P, 3] float32)."""
        q = self.query
        out = torch.empty_like(points, dtype=torch.float32)
        nout = torch.empty_like(out)
        for s in range(0, points.shape[0], chunk):
            p = points[s:s + chunk].to(torch.float32)
            _, idx = q.tree.query(p.detach().cpu().numpy().astype(np.float64), k=q.k, workers=-1)
            idx = torch.as_tensor(np.asarray(idx).reshape(len(p), q.k), device=q.tri.device)
            cand = closest_on_triangles(p[:, None, :].expand(-1, q.k, -1), q.tri[idx])
            d = ((cand - p[:, None, :]) ** 2).sum(-1)
            best = d.argmin(1)
            rows = torch.arange(len(p), device=p.device)
            c = cand[rows, best]
            face = idx[rows, best]
            out[s:s + chunk] = c
            bary = _barycentric3(q.tri[face], c)
            nout[s:s + chunk] = F.normalize((self.nrm[face] * bary[..., None]).sum(1), dim=1)
        return out, nout


def _barycentric3(tri: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Barycentrics [P, 3] (clamped >= 0, summing to 1) of points p [P, 3] lying on triangles tri [P, 3, 3]."""
    a = tri[:, 0]
    v0, v1, v2 = tri[:, 1] - a, tri[:, 2] - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = d00 * d11 - d01 * d01
    den = torch.where(den.abs() > 1e-30, den, torch.ones_like(den))   # degenerate triangle: weight vertex a
    y = (d11 * d20 - d01 * d21) / den
    z = (d00 * d21 - d01 * d20) / den
    w = torch.stack([1 - y - z, y, z], 1).clamp_min(0)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)
