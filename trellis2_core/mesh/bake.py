"""Bake O-Voxel PBR attributes into UV textures (SPEC 15 steps 4-5), on any device, memory bounded by chunking.

Per texel: rasterise the UV layout (raster.py), interpolate the 3D position (engine Z-up frame, the frame the voxels
live in), optionally move it to the closest point of a reference surface (the high-resolution decoded mesh, as the
reference does after remeshing/decimation), sample the voxel attributes trilinearly (ovoxel/attributes.py) and write
uint8 textures; optionally (normal_map=True) also a tangent-space normal map: the reference surface's interpolated
normal at each texel's closest point, in the texel's tangent frame (normal_map.py). Texels outside every chart are
filled by seam dilation (iterative masked neighbour averaging, then a pull-push fill for the rest) so bilinear
filtering and mipmaps never pull in black.

Cancellation: an optional ``should_stop()`` is polled before the rasteriser, before every chunk of texels, between
the 2^18-texel pieces of a chunk's projection (the costly step) and before the seam fill; True raises
``Interrupted`` and nothing of the partial bake escapes (the maps are only built at the very end). The rasteriser,
the reference's k-d tree build, the voxel sampling of one chunk and the seam fill are not polled inside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, stop_if_asked
from ..ovoxel.attributes import VoxelAttributeField, world_to_grid
from .closest import ClosestPointQuery
from .mesh import Mesh, PBRMaps
from .normal_map import SurfaceNormalQuery, encode_tangent_space, renormalize_encoded, texel_frames, with_tangents
from .raster import rasterize_uv

log = logging.getLogger(__name__)

# ClosestPointQuery.query and SurfaceNormalQuery.project work in pieces of this many points: splitting a chunk at the
# same boundaries to poll should_stop between them leaves every result bit-identical.
PROJECT_PIECE = 1 << 18


@dataclass(frozen=True)
class AttributeLayout:
    """Channels of the voxel attributes (SPEC 9: base_color 0:3, metallic 3, roughness 4, alpha 5; values in [0, 1])."""

    base_color: tuple[int, int] = (0, 3)
    metallic: int = 3
    roughness: int = 4
    alpha: int | None = 5


def bake_textures(
    mesh: Mesh,
    field: VoxelAttributeField,
    resolution: int,
    *,
    texture_size: int = 2048,
    reference: Mesh | None = None,
    layout: AttributeLayout = AttributeLayout(),
    aabb_min: float = -0.5,
    aabb_size: float = 1.0,
    dilation: int = 2,
    chunk: int = 1 << 20,
    progress=None,
    normal_map: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> PBRMaps:
    """Textures for `mesh` (which must have UVs) from voxel attributes.

    mesh: vertices in the engine frame (Z-up cube [-0.5, 0.5]^3, before zup_to_yup), uvs in glTF convention.
    field: the voxels' attributes (coords at `resolution`), values nominally in [0, 1] (clipped when quantised).
    reference: optional surface to project texel positions onto (closest point) before sampling; None = sample at the
    mesh's own surface (right when the mesh is the decoded surface itself, e.g. only decimated slightly).
    texture_size: H = W, up to 8192; memory is ~ 60 bytes per texel plus chunk-sized temporaries.
    dilation: texels of neighbour-averaging around charts before the pull-push fill of the rest (0 = pull-push only).
    progress: optional callable(done, total) per sampled chunk.
    normal_map: also bake PBRMaps.normal (glTF tangent space, linear, +Y = green up) from `reference`'s vertex normals
    at the closest point (without a reference the map is flat, (128, 128, 255)). The map is only valid with the tangents
    it was baked in: those of `mesh.tangents` if set, else normal_map.with_tangents(mesh)'s (deterministic), which the
    caller must attach to the mesh it exports (textured_mesh and bake_ovoxel do; export_glb recomputes them if absent).
    should_stop: optional callable polled before rasterising, between pieces of 2^18 texels and before the seam fill;
    True raises ``Interrupted`` (inputs untouched, no partial maps returned). None = never interrupted.
    Returns PBRMaps: base_color RGBA (sRGB values as the decoder produces them, alpha linear), metallic_roughness
    (R 0, G roughness, B metallic), normal [H, W, 3] or None.
    """
    if not isinstance(mesh, Mesh) or mesh.uvs is None:
        raise InputError("mesh: expected a Mesh with uvs; unwrap it first (trellis2_core.mesh.uv.unwrap)")
    if not isinstance(field, VoxelAttributeField):
        raise InputError(f"field: expected a VoxelAttributeField, got {type(field).__name__}")
    need = max(layout.base_color[1], layout.metallic + 1, layout.roughness + 1, (layout.alpha or 0) + 1)
    if field.channels < need:
        raise InputError(f"field: layout {layout} needs {need} channels, the field has {field.channels}")
    if not isinstance(texture_size, int) or not 1 <= texture_size <= 8192:
        raise InputError(f"texture_size: expected an int in [1, 8192], got {texture_size!r}")
    size = texture_size
    device = field.device
    verts = mesh.vertices.to(device)
    faces = mesh.faces.to(device)
    stop_if_asked(should_stop, "texture bake interrupted before rasterising the UV layout")
    t0 = time.perf_counter()
    face, bary = rasterize_uv(mesh.uvs.to(device), faces, size, size)
    secs = {"raster": time.perf_counter() - t0}
    secs.update(project=0.0, sample=0.0)
    texels = torch.nonzero(face >= 0).squeeze(1)
    tface = face[texels]
    tbary = bary[texels]
    del face, bary
    query = ClosestPointQuery(reference.vertices.to(device), reference.faces.to(device)) if reference is not None \
        else None
    nch = 6
    if normal_map:
        tmesh = (mesh if mesh.tangents is not None else with_tangents(mesh)).to(device)
        nquery = SurfaceNormalQuery(query, reference) if query is not None else None
        nch = 9                                        # + encoded normal xyz, seam-filled with the rest
    img = torch.zeros(size * size, nch, dtype=torch.float32, device=device)  # r g b a | metallic roughness
    total = max((len(texels) + chunk - 1) // chunk, 1)
    for n, s in enumerate(range(0, len(texels), chunk)):
        fidx = faces[tface[s:s + chunk]]                              # [c, 3]
        p = (verts[fidx] * tbary[s:s + chunk, :, None]).sum(1)           # texel positions, engine frame
        stop_if_asked(should_stop, f"texture bake interrupted while sampling texels (chunk {n + 1}/{total})")
        t0 = time.perf_counter()
        if normal_map:
            tt, tb, tn = texel_frames(tmesh, tface[s:s + chunk], tbary[s:s + chunk])
            if nquery is not None:
                p, ref_n = _in_pieces(nquery.project, p, should_stop, n, total)  # query.query's points + normals
            else:
                ref_n = tn
            enc = encode_tangent_space(ref_n, tt, tb, tn)
        elif query is not None:
            p = _in_pieces(query.query, p, should_stop, n, total)[0]
        secs["project"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        a = field.sample(world_to_grid(p, resolution, aabb_min, aabb_size)).to(torch.float32)
        secs["sample"] += time.perf_counter() - t0
        b0, b1 = layout.base_color
        alpha = a[:, layout.alpha:layout.alpha + 1] if layout.alpha is not None else torch.ones_like(a[:, :1])
        vals = [a[:, b0:b1], alpha, a[:, layout.metallic:layout.metallic + 1],
                a[:, layout.roughness:layout.roughness + 1]]
        img[texels[s:s + chunk]] = torch.cat(vals + [enc] if normal_map else vals, 1)
        if progress:
            progress(n + 1, total)
    mask = torch.zeros(size * size, dtype=torch.bool, device=device)
    mask[texels] = True
    img = img.view(size, size, nch)
    mask = mask.view(size, size)
    coverage = float(mask.float().mean())
    stop_if_asked(should_stop, "texture bake interrupted before the seam fill")
    t0 = time.perf_counter()
    filled = fill_outside(img, mask, dilation)  # all 6 (9) channels at once: the frontier work is shared
    secs["fill"] = time.perf_counter() - t0
    del img
    color, mr = filled[..., :4], filled[..., 4:6]
    normal = _to_u8(renormalize_encoded(filled[..., 6:9])) if normal_map else None
    base = _to_u8(color)
    zeros = torch.zeros(size, size, 1, device=device)
    mr_img = _to_u8(torch.cat([zeros, mr[..., 1:2], mr[..., 0:1]], -1))  # R 0, G roughness, B metallic
    log.info("bake: %dx%d, %d faces, coverage %.1f%%, seconds: %s", size, size, mesh.num_faces, 100 * coverage,
             ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
    return PBRMaps(base_color=base, metallic_roughness=mr_img, normal=normal)


def _in_pieces(project, p: torch.Tensor, should_stop, n: int, total: int) -> tuple[torch.Tensor, ...]:
    """``project(p)`` (one tensor or a tuple, each [P, ...]) run on pieces of PROJECT_PIECE points, polling
    should_stop between them; the same pieces the projection makes itself, so the result is bit-identical."""
    if should_stop is None or p.shape[0] <= PROJECT_PIECE:
        out = project(p)
        return out if isinstance(out, tuple) else (out,)
    parts = []
    for s in range(0, p.shape[0], PROJECT_PIECE):
        if s:
            stop_if_asked(should_stop, f"texture bake interrupted while projecting texels (chunk {n + 1}/{total})")
        out = project(p[s:s + PROJECT_PIECE])
        parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(col) for col in zip(*parts))


def _to_u8(x: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] -> uint8 (SPEC 15: clip(x * 255) then truncate; we round to nearest instead)."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def fill_outside(img: torch.Tensor, mask: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """Fill texels where mask is False from the covered ones. img [H, W, C] float, mask [H, W] bool -> [H, W, C].

    First `dilation` rounds of averaging the covered 8-neighbours (grows charts by one texel per round: clean seams
    under bilinear filtering), then a pull-push fill (masked 2x2 means up a pyramid, nearest back down) for the rest,
    so every texel ends with a nearby colour, never black. Covered texels are never changed.
    Dilation touches only the frontier (texels next to the grown charts), not the whole image.
    """
    if not mask.any():
        return torch.zeros_like(img)
    h, w, ch = img.shape
    xc = (img * mask[..., None]).reshape(h * w, ch).t().contiguous()  # planar [C, HW]: index_select is fastest
    m = mask.reshape(-1).clone()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    grow = F.max_pool2d(mask[None, None].to(img.dtype), 3, 1, 1)[0, 0].reshape(-1) > 0
    front = torch.nonzero(grow & ~m).squeeze(1)
    for _ in range(dilation):
        if front.numel() == 0:
            break
        r, c = front // w, front % w
        acc = torch.zeros(ch, front.numel(), dtype=img.dtype, device=img.device)
        cnt = torch.zeros(front.numel(), dtype=img.dtype, device=img.device)
        nxt = torch.zeros(h * w, dtype=torch.bool, device=img.device)
        for dy, dx in offsets:
            rr, cc = r + dy, c + dx
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            nid = rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)
            covered = m.index_select(0, nid)
            valid = ok & covered
            acc += xc.index_select(1, nid) * valid
            cnt += valid
            nxt[nid[ok & ~covered]] = True
        xc.index_copy_(1, front, acc / cnt.clamp_min(1))
        m[front] = True
        front = torch.nonzero(nxt & ~m).squeeze(1)
    x = xc.t().reshape(h, w, ch)
    out = _pull_push(x.permute(2, 0, 1)[None], m.reshape(1, 1, h, w).to(img.dtype))
    return out[0].permute(1, 2, 0).contiguous()


def _pull_push(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [1, C, H, W] valid where m [1, 1, H, W] > 0 -> x with every invalid texel filled from coarser levels."""
    if bool(m.min() > 0):
        return x
    h, w = x.shape[-2:]
    if h == 1 and w == 1:
        return x  # unreachable when any texel is valid: the 1x1 level then is valid
    s = F.avg_pool2d(x * m, 2, 2, ceil_mode=True)
    c = F.avg_pool2d(m, 2, 2, ceil_mode=True)
    coarse = _pull_push(s / c.clamp_min(1e-12), (c > 0).to(m.dtype))
    up = F.interpolate(coarse, scale_factor=2, mode="nearest")[..., :h, :w]
    return torch.where(m > 0, x, up)
