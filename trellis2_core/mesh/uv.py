"""UV unwrap with bounded time: split the mesh into small patches, then let xatlas chart and pack them together.

xatlas's charting is superlinear in the face count of one mesh (2 cores: 13 s / 63 s / 166 s on 50k / 100k / 200k
faces) but splitting into ~1.3k patches first brings 200k faces to ~6 s. Patches here are connected groups of faces
that share a cube-map direction (the dominant axis of the face normal, so no patch folds over more than ~55 degrees
from its axis) and a cell of a spatial grid sized so a patch holds about `max_patch_faces` faces; oversized patches
are split again on a finer grid. Each patch goes to xatlas as its own mesh (charted in parallel, bounded cost), and
xatlas packs all charts into one atlas. The reference (SPEC 15 step 3) does the same in spirit: cone clustering on
the GPU, then xatlas per chart.

Output UVs follow glTF (origin top-left, v down; see mesh.py); vertices are split along seams. xatlas lays out some
charts mirrored (its fix_winding option does not change that); harmless for the baked colour/material maps, which
are sampled per texel in 3D; the normal map handles it with per-vertex tangent handedness (normal_map.py, TANGENT.w).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..errors import InputError
from .mesh import Mesh, vertex_normals
from .topology import edge_face_counts, triangle_areas

log = logging.getLogger(__name__)


def unwrap(mesh: Mesh, *, texture_size: int = 2048, reuse_existing: bool = False, max_patch_faces: int = 256,
           padding: int = 1, progress=None) -> Mesh:
    """Return a copy of `mesh` with per-vertex UVs in [0, 1] (vertices split at seams) and vertex normals.

    texture_size: the texture the atlas is packed for (padding is in its texels); square atlas.
    reuse_existing: if the mesh already has UVs inside [0, 1], return it unchanged (normals filled in if missing).
    max_patch_faces: upper bound on faces per xatlas mesh; bounds the time (see module docstring).
    padding: texels left between charts (plus xatlas's bilinear margin), so dilation can fill seams.
    progress: optional callable(done, total) called with (0, 2), (1, 2) after charting, (2, 2) at the end.
    Normals: the input's normals gathered through the seam split, or area-weighted vertex normals if it has none.
    Degenerate (zero-area) faces are dropped: they cannot be charted.
    """
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a trellis2_core.mesh.Mesh, got {type(mesh).__name__}")
    if not isinstance(texture_size, int) or not 16 <= texture_size <= 16384:
        raise InputError(f"texture_size: expected an int in [16, 16384], got {texture_size!r}")
    if max_patch_faces < 16:
        raise InputError(f"max_patch_faces: expected >= 16, got {max_patch_faces}")
    if reuse_existing and mesh.uvs is not None:
        uv = mesh.uvs
        if uv.numel() and (float(uv.min()) < -1e-6 or float(uv.max()) > 1 + 1e-6):
            raise InputError(f"mesh.uvs: reuse_existing=True needs UVs inside [0, 1], got range "
                             f"[{float(uv.min()):.3g}, {float(uv.max()):.3g}] (tiled UVs); pass reuse_existing=False "
                             "to unwrap anew")
        normals = mesh.normals if mesh.normals is not None else vertex_normals(mesh.vertices, mesh.faces)
        return mesh.replace(normals=normals)
    try:
        import xatlas
    except ImportError as e:
        raise ImportError("unwrap needs the 'xatlas' package (MIT, prebuilt wheels): pip install xatlas; "
                          "or pass a mesh with UVs and reuse_existing=True") from e
    if mesh.num_faces == 0:
        raise InputError("mesh: has no faces; nothing to unwrap")
    device = mesh.vertices.device
    normals = mesh.normals if mesh.normals is not None else vertex_normals(mesh.vertices, mesh.faces)
    v = mesh.vertices.detach().cpu().numpy()
    f = mesh.faces.detach().cpu().numpy()
    good = triangle_areas(v, f) > 0
    if not good.all():
        log.info("unwrap: dropping %d zero-area faces", int((~good).sum()))
        f = f[good]
    labels = split_patches(v, f, max_patch_faces)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    if progress:
        progress(0, 2)
    atlas = xatlas.Atlas()
    patch_verts = []
    for p in range(len(bounds) - 1):
        pf = f[order[bounds[p]:bounds[p + 1]]]
        uniq, local = np.unique(pf, return_inverse=True)
        patch_verts.append(uniq)
        atlas.add_mesh(np.ascontiguousarray(v[uniq], dtype=np.float32), local.reshape(-1, 3).astype(np.uint32))
    chart_opts = xatlas.ChartOptions()  # xatlas defaults = the reference's (SPEC 15 step 3)
    pack_opts = xatlas.PackOptions()
    pack_opts.padding = int(padding)
    pack_opts.bilinear = True
    # One generate call (charting is the expensive part): no fixed resolution, so xatlas grows a single atlas as
    # needed; texels_per_unit is set from the surface area so that atlas comes out near texture_size at ~70% fill.
    area = float(triangle_areas(v, f).sum())
    pack_opts.texels_per_unit = float(np.sqrt(0.7 * texture_size ** 2 / max(area, 1e-12)))
    atlas.generate(chart_opts, pack_opts)
    if progress:
        progress(1, 2)
    new_src, new_uv = [], []
    out_faces = np.empty_like(f)
    offset = 0
    for p in range(len(bounds) - 1):
        vmap, idx, uv = atlas[p]
        if idx.size != 3 * (bounds[p + 1] - bounds[p]):
            raise RuntimeError(f"unwrap: xatlas returned {idx.size // 3} faces for a patch of "
                               f"{bounds[p + 1] - bounds[p]}; repair the mesh first (repair_mesh)")
        new_src.append(patch_verts[p][vmap.astype(np.int64)])
        new_uv.append(uv)
        out_faces[order[bounds[p]:bounds[p + 1]]] = idx.astype(np.int64).reshape(-1, 3) + offset
        offset += len(vmap)
    src = np.concatenate(new_src)
    # xatlas normalises u by the atlas width and v by its height; rescale so texels stay square
    w, h = atlas.width, atlas.height
    uvs = np.concatenate(new_uv).astype(np.float64) * (np.array([w, h]) / max(w, h))
    uvs = np.clip(uvs, 0.0, 1.0).astype(np.float32)
    if progress:
        progress(2, 2)
    src_t = torch.from_numpy(src).to(device)
    log.info("unwrap: %d faces, %d patches, %d charts, %d -> %d vertices, atlas %dx%d, utilisation %.2f", len(f),
             len(bounds) - 1, atlas.chart_count, mesh.num_vertices, len(src), w, h, atlas.utilization)
    return Mesh(mesh.vertices[src_t].contiguous(), torch.from_numpy(out_faces).to(device),
                normals=normals[src_t].contiguous(), uvs=torch.from_numpy(uvs).to(device))


def split_patches(vertices: np.ndarray, faces: np.ndarray, max_patch_faces: int) -> np.ndarray:
    """Label [F] int64 in [0, P): edge-connected faces within one cell of a spatial grid (module docstring).

    The grid is sized from the surface area so a cell holds about max_patch_faces faces; patches still over the
    limit are split again on a grid twice as fine (up to 8 times); slivers under max_patch_faces / 16 faces are merged
    into a neighbouring patch. Labels are numbered by first face, so the split is deterministic.
    """
    nf = len(faces)
    t = vertices[faces].astype(np.float64)
    cen = t.mean(1)
    lo = cen.min(0)
    area = triangle_areas(vertices, faces).sum()
    cell = np.sqrt(max(area, 1e-20) * max_patch_faces / nf)  # a cell holds a surface piece of ~max_patch_faces faces
    pairs = _adjacent_face_pairs(faces, len(vertices))
    labels = np.zeros(nf, np.int64)
    for level in range(9):
        big = np.bincount(labels)[labels] > max_patch_faces
        if not big.any():
            break
        g = np.floor((cen - lo) / (cell / 2 ** level)).astype(np.int64)
        gk = (g[:, 0] * 1_000_003 + g[:, 1]) * 1_000_033 + g[:, 2]
        labels = _components(np.where(big, _mix(labels, gk), _mix(labels, np.int64(-1))), pairs, nf)
    # merge slivers (a few faces cut off at cell corners) into the neighbour across their first shared edge
    sizes = np.bincount(labels)
    la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
    cross = la != lb
    la, lb = la[cross], lb[cross]
    src = np.concatenate([la, lb])
    dst = np.concatenate([lb, la])
    small = sizes[src] < max(max_patch_faces // 16, 2)
    target = np.arange(len(sizes))
    order = np.lexsort((dst[small], src[small]))
    s_src, s_dst = src[small][order], dst[small][order]
    first = np.unique(s_src, return_index=True)[1]
    target[s_src[first]] = s_dst[first]
    # groups = components of the patch graph with one link per sliver (each holds at most one non-sliver patch)
    link = sp.coo_matrix((np.ones(len(sizes), np.int8), (np.arange(len(sizes)), target)), shape=(len(sizes),) * 2)
    merged = connected_components(link, directed=False)[1]
    return _components(merged[labels], pairs, nf)


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A 64-bit combination of two int64 keys (wrapping arithmetic; equal inputs give equal outputs)."""
    with np.errstate(over="ignore"):
        return a.astype(np.int64) * np.int64(-7046029254386353131) + b.astype(np.int64)


def _adjacent_face_pairs(faces: np.ndarray, nv: int) -> np.ndarray:
    """[K, 2] faces sharing an edge (for an edge used by several faces, consecutive ones are linked)."""
    keys, _, _ = edge_face_counts(faces, nv)
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]
    return np.stack([order[:-1][same] // 3, order[1:][same] // 3], 1)


def _components(key: np.ndarray, pairs: np.ndarray, nf: int) -> np.ndarray:
    """Connected components of the face graph restricted to edges between faces with equal key."""
    keep = key[pairs[:, 0]] == key[pairs[:, 1]]
    p = pairs[keep]
    g = sp.coo_matrix((np.ones(len(p), np.int8), (p[:, 0], p[:, 1])), shape=(nf, nf))
    _, lab = connected_components(g, directed=False)
    _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]
