"""UV unwrap with bounded time: split the mesh into small patches, then let xatlas chart and pack them together.

xatlas's charting is superlinear in the face count of one mesh (2 cores: 13 s / 63 s / 166 s on 50k / 100k / 200k
faces) but splitting into patches of a few hundred faces first brings 200k faces to a few seconds. Patches here are
edge-connected groups of faces inside one cell of a spatial grid sized so a patch holds about `max_patch_faces`
faces; oversized patches are split again on a finer grid. Each patch goes to xatlas as its own mesh (charted in
parallel, bounded cost), and xatlas packs all charts into one atlas. The reference (SPEC 15 step 3) does the same in
spirit: cone clustering on the GPU, then xatlas per chart.

Patch size vs texture use (bench/bench_uv.py, decimated bumpy blob, 2048^2, this 2-core shared box; utilisation =
texels whose centre lies in a UV triangle): every chart pays a ring of conservative-raster, bilinear and padding
texels, so small charts waste texture. 256-face patches: 200k faces 4141 charts, 48.1% used, 2.9 s wall / 4.3 s CPU;
50k faces 52.3%. 512-face patches (default): 200k 2933 charts, 51.2%, 3.4 s wall / 5.7 s CPU (+16% / +30%); 50k 55.1%.
1024-face patches reach 53.1% at 200k but cost +64% wall / +98% CPU. The rest is xatlas's packing gaps (its chart
bitmaps fill ~67% of its atlas). Options that did not pay: bruteForce packing (+6 points at 50k for ~10x the time);
blockAlign or rotation settings (within +-1 point; no rotate_charts_to_axis -0.7 to -2.4); a larger texels_per_unit
target (+1.5 points, but the atlas is then shrunk so far that padding falls below one texel); padding 0 (+2.8 points,
no room left for seam dilation); a second pack pass into exactly texture_size^2 (52.7% vs 55.1% at 50k, +5 s of
retries); projecting flat regions ourselves and letting xatlas only pack (tried in session 2: -0.3 to +1.3 points,
+17-46% CPU; on an all-flat box 10x fewer charts still filled the same 73.8%: the packer is the limit).
Known: xatlas folds a few texels inside some of its own charts (111 texels covered twice at 50k faces, 238 at 200k).

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


def unwrap(mesh: Mesh, *, texture_size: int = 2048, reuse_existing: bool = False, max_patch_faces: int = 512,
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
        import xatlas  # noqa: F401  (checked here for a clear error; used in xatlas_layout)
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
    if progress:
        progress(0, 2)
    src, out_faces, uvs, info = xatlas_layout(v, f, texture_size, max_patch_faces, padding,
                                              on_charted=(lambda: progress(1, 2)) if progress else None)
    if progress:
        progress(2, 2)
    src_t = torch.from_numpy(src).to(device)
    log.info("unwrap: %d faces, %d patches, %d charts, %d -> %d vertices, atlas %s, xatlas utilisation %.2f", len(f),
             info["patches"], info["charts"], mesh.num_vertices, len(src), info["atlas"], info["xatlas_utilisation"])
    return Mesh(mesh.vertices[src_t].contiguous(), torch.from_numpy(out_faces).to(device),
                normals=normals[src_t].contiguous(), uvs=torch.from_numpy(uvs).to(device))


def xatlas_layout(v: np.ndarray, f: np.ndarray, texture_size: int, max_patch_faces: int, padding: int, *,
                  pack: dict | None = None, fill: float = 0.7, on_charted=None):
    """The unwrap core on numpy arrays (no degenerate faces): patch split, one xatlas generate, glTF-ready UVs.

    v [V, 3] float, f [F, 3] int64 -> (src [V'] int64 input vertex of each output vertex, faces [F, 3] int64 in the
    input face order, uvs [V', 2] float32 in [0, 1] with square texels, info dict). `pack` overrides xatlas
    PackOptions fields and `fill` the texels_per_unit target (both for bench/bench_uv.py; unwrap uses the defaults).
    """
    import xatlas

    labels = split_patches(v, f, max_patch_faces)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
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
    pack_opts.texels_per_unit = float(np.sqrt(fill * texture_size ** 2 / max(area, 1e-12)))
    for key, value in (pack or {}).items():
        setattr(pack_opts, key, value)
    atlas.generate(chart_opts, pack_opts)
    if on_charted:
        on_charted()
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
    info = dict(patches=len(bounds) - 1, charts=atlas.chart_count, atlas=f"{w}x{h}",
                xatlas_utilisation=float(np.mean(atlas.utilization)))
    return src, out_faces, uvs, info


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


def texel_coverage(uvs, faces, size: int) -> torch.Tensor:
    """Per-texel triangle count [size, size] int32 of a UV layout on a size x size texture (row = v * size).

    uvs [V, 2] float in [0, 1], faces [F, 3] int (numpy or torch). A texel counts a triangle when its centre lies
    strictly inside the triangle's UV image, so neighbours that only share an edge never count twice: a count > 1 is
    a real overlap, and (count > 0).mean() is the fraction of the texture the charts fill (their "utilisation").
    """
    uv = torch.as_tensor(uvs).detach().cpu().to(torch.float64) * size
    tri = uv[torch.as_tensor(faces).detach().cpu().to(torch.int64)]            # [F, 3, 2] texel units
    lo = torch.ceil(tri.min(1).values - 0.5).clamp_min(0).to(torch.int64)
    hi = torch.floor(tri.max(1).values - 0.5).to(torch.int64).clamp_max(size - 1)
    span = (hi - lo + 1).clamp_min(0)
    count = span[:, 0] * span[:, 1]
    ends = torch.cumsum(count, 0)
    out = torch.zeros(size * size, dtype=torch.int32)
    f0, nf = 0, tri.shape[0]
    while f0 < nf:  # chunks of ~4M candidate texels bound the memory
        base = int(ends[f0 - 1]) if f0 else 0
        f1 = max(int(torch.searchsorted(ends, torch.tensor(base + (1 << 22)), right=True)), f0 + 1)
        c = count[f0:f1]
        fid = torch.repeat_interleave(torch.arange(f0, f1), c)
        k = torch.arange(int(c.sum())) - (torch.cumsum(c, 0) - c)[fid - f0]
        tx, ty = lo[fid, 0] + k % span[fid, 0], lo[fid, 1] + k // span[fid, 0]
        p = torch.stack([tx, ty], 1).to(torch.float64) + 0.5
        t = tri[fid]
        d = [(t[:, (i + 1) % 3, 0] - t[:, i, 0]) * (p[:, 1] - t[:, i, 1])
             - (t[:, (i + 1) % 3, 1] - t[:, i, 1]) * (p[:, 0] - t[:, i, 0]) for i in range(3)]
        inside = ((d[0] > 0) & (d[1] > 0) & (d[2] > 0)) | ((d[0] < 0) & (d[1] < 0) & (d[2] < 0))
        out += torch.bincount((ty * size + tx)[inside], minlength=size * size).to(torch.int32)
        f0 = f1
    return out.view(size, size)
