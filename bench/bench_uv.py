"""Benchmark UV unwrap options on decimated TRELLIS-like meshes: time, chart count, texture utilisation, stretch.

Meshes: the dual-grid bumpy blob of bench_mesh.py (grid 130 / 260), repaired and decimated to ~50k / ~200k faces.
Per option set: unwrap wall and CPU seconds (xatlas charts patches on several threads; CPU time is steadier on a shared
box), number of charts, utilisation = fraction of the texture_size^2 texels whose centre lies inside a UV triangle
(texel_coverage), overlap = texels covered twice, and the worst texel-density ratio (sqrt of UV area / 3D area per
face over the mesh average; 1 = uniform, small = under-sampled faces).

    python bench/bench_uv.py                      # both sizes, the quick option sets
    python bench/bench_uv.py --sizes 50000 --all  # also the slow ones (bruteForce, 4096-face patches)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_mesh import blob_mesh
from trellis2.trellis2_core.mesh.decimate import decimate
from trellis2.trellis2_core.mesh.mesh import Mesh
from trellis2.trellis2_core.mesh.repair import repair_mesh
from trellis2.trellis2_core.mesh.topology import triangle_areas
from trellis2.trellis2_core.mesh.uv import texel_coverage, xatlas_layout

# name -> (layout kwargs, repack fill or None, slow)
OPTIONS = {
    "old default (256-face patches)": (dict(max_patch_faces=256), None, False),
    "new default (512-face patches)": (dict(max_patch_faces=512), None, False),
    "1024-face patches": (dict(max_patch_faces=1024), None, False),
    "4096-face patches": (dict(max_patch_faces=4096), None, True),
    "512, padding 0": (dict(max_patch_faces=512, padding=0), None, False),
    "512, padding 2": (dict(max_patch_faces=512, padding=2), None, False),
    "512, blockAlign": (dict(max_patch_faces=512, pack=dict(blockAlign=True)), None, False),
    "512, no rotate_charts_to_axis": (dict(max_patch_faces=512, pack=dict(rotate_charts_to_axis=False)), None, False),
    "512, no rotation": (dict(max_patch_faces=512, pack=dict(rotate_charts=False)), None, False),
    "512, fill 0.5": (dict(max_patch_faces=512, fill=0.5), None, False),
    "512, fill 1.0": (dict(max_patch_faces=512, fill=1.0), None, False),
    "512, repack at resolution (80%)": (dict(max_patch_faces=512), 0.8, False),
    "512, bruteForce": (dict(max_patch_faces=512, pack=dict(bruteForce=True)), None, True),
}


def make_mesh(faces: int) -> tuple[np.ndarray, np.ndarray]:
    res = 130 if faces <= 60_000 else 260  # ~2.2x the target before decimation, as after a real extraction
    v, f, _ = blob_mesh(res)
    rep, _ = repair_mesh(Mesh.from_numpy(v, f))
    dec = decimate(rep, faces)
    return dec.vertices.numpy().astype(np.float64), dec.faces.numpy()


def repack(uv: np.ndarray, faces: np.ndarray, size: int, fill: float, padding: int):
    """Second xatlas pass: repack the charts into exactly size x size (3% smaller per retry until it fits)."""
    import xatlas

    t = uv[faces] * size
    area = float(np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                        - (t[:, 2, 0] - t[:, 0, 0]) * (t[:, 1, 1] - t[:, 0, 1])).sum() / 2)
    scale = np.sqrt(fill * size * size / area)
    while True:
        atlas = xatlas.Atlas()
        atlas.add_uv_mesh((uv * size).astype(np.float32), faces.astype(np.uint32))
        opts = xatlas.PackOptions()
        opts.padding, opts.bilinear, opts.resolution, opts.texels_per_unit = padding, True, size, float(scale)
        atlas.generate(xatlas.ChartOptions(), opts)
        if atlas.atlas_count == 1:
            vmap, idx, uv2 = atlas[0]
            return vmap.astype(np.int64), idx.astype(np.int64).reshape(-1, 3), uv2 * [atlas.width / size,
                                                                                       atlas.height / size]
        scale *= 0.97


def run(v, f, size, kwargs, refill):
    kwargs = dict(kwargs)
    mpf, padding = kwargs.pop("max_patch_faces"), kwargs.pop("padding", 1)
    t, c = time.perf_counter(), time.process_time()
    src, faces, uv, info = xatlas_layout(v, f, size, mpf, padding, **kwargs)
    if refill is not None:
        vmap, faces, uv = repack(uv.astype(np.float64), faces, size, refill, padding)
        src = src[vmap]
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cover = texel_coverage(uv, faces, size)
    tri = uv.astype(np.float64)[faces]
    auv = np.abs((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                 - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])) / 2
    a3 = triangle_areas(v[src], faces)
    dens = np.sqrt(auv / a3 / (auv.sum() / a3.sum()))
    return dict(wall=wall, cpu=cpu, charts=info["charts"], util=float((cover > 0).float().mean()),
                overlap=int((cover > 1).sum()), dmin=float(dens.min()), dmax=float(dens.max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000], help="target face counts")
    ap.add_argument("--texture", type=int, default=2048, help="texture size")
    ap.add_argument("--all", action="store_true", help="also the slow option sets (minutes at 200k faces)")
    ap.add_argument("--only", nargs="*", default=None, help="option names to run (substring match)")
    args = ap.parse_args()
    print("| faces | options | wall s | CPU s | charts | utilisation | overlap texels | density min / max |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for n in args.sizes:
        v, f = make_mesh(n)
        for name, (kw, refill, slow) in OPTIONS.items():
            if (slow and not args.all) or (args.only is not None and not any(o in name for o in args.only)):
                continue
            r = run(v, f, args.texture, kw, refill)
            print(f"| {len(f)} | {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['charts']} | {r['util']:.3f} | "
                  f"{r['overlap']} | {r['dmin']:.2f} / {r['dmax']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
