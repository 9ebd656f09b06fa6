"""Benchmark the production mesh chain on a ~1M-face TRELLIS-like mesh: repair, decimate, unwrap, bake, export.

The input imitates a flexible-dual-grid extraction (SPEC 10): one vertex per active voxel of a bumpy blob at grid
resolution R, a quad per sign-changing grid edge split into two triangles, the winding of each quad random (the
decoder's is not consistent either), plus a few holes and floating specks. Voxel PBR attributes: a 3D colour ramp.

    python bench/bench_mesh.py                       # CPU, R = 400 (~1M faces), target 200k, texture 2048
    python bench/bench_mesh.py --device cuda         # bake on the GPU (the other steps are CPU by design)

Prints one table row per step: wall seconds and peak memory over the step (host RSS growth above the step's start;
plus CUDA peak when baking on a GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time

import numpy as np
import torch

from trellis2.trellis2_core.mesh.bake import bake_textures
from trellis2.trellis2_core.mesh.decimate import decimate
from trellis2.trellis2_core.mesh.glb import export_glb
from trellis2.trellis2_core.mesh.mesh import Mesh, mesh_zup_to_yup, vertex_normals
from trellis2.trellis2_core.mesh.repair import repair_mesh
from trellis2.trellis2_core.mesh.uv import unwrap
from trellis2.trellis2_core.ovoxel.attributes import VoxelAttributeField


def blob_mesh(res: int, seed: int = 0):
    """Dual-grid mesh of a bumpy blob: (vertices [V, 3] float32 engine frame, faces [F, 3] int64, coords [N, 3])."""
    ax = (np.arange(res + 1, dtype=np.float32) / res) - 0.5                       # grid points (voxel corners)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij", sparse=True)
    r = np.sqrt(x * x + y * y + z * z) + 1e-9
    bump = 0.04 * np.sin(9 * x / r) * np.cos(7 * y / r) + 0.03 * np.sin(13 * z / r + 1) + 0.02 * np.sin(31 * x * y / r)
    sdf = (r - (0.36 + bump)).astype(np.float32)
    inside = sdf < 0
    del r, bump
    # active voxels: a sign change among the 8 corners
    occ = np.zeros((res, res, res), np.uint8)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                occ += inside[dx:res + dx, dy:res + dy, dz:res + dz]
    active = (occ > 0) & (occ < 8)
    coords = np.argwhere(active)
    index = np.full((res, res, res), -1, np.int64)
    index[tuple(coords.T)] = np.arange(len(coords))
    # vertex: voxel centre moved toward the surface along the sdf gradient (surface-nets-like, cheap)
    c = tuple(coords.T)
    s0 = sdf[c]
    grad = np.stack([sdf[(coords[:, 0] + 1, coords[:, 1], coords[:, 2])] - s0,
                     sdf[(coords[:, 0], coords[:, 1] + 1, coords[:, 2])] - s0,
                     sdf[(coords[:, 0], coords[:, 1], coords[:, 2] + 1)] - s0], 1) * res
    sc = sum(sdf[(coords[:, 0] + dx, coords[:, 1] + dy, coords[:, 2] + dz)]
             for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)) / 8
    gn = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-6)
    off = np.clip(-sc[:, None] * gn * res, -0.5, 0.5)
    verts = ((coords + 0.5 + off) / res - 0.5).astype(np.float32)
    quads = []
    for a in range(3):  # grid edges along axis a through corner (i, j, k): the 4 voxels around it
        e = [np.arange(1, res)] * 3
        e[a] = np.arange(res)
        ii, jj, kk = np.meshgrid(*e, indexing="ij")
        p0 = (ii, jj, kk)
        p1 = tuple(q + (1 if b == a else 0) for b, q in enumerate(p0))
        flip = inside[p0] != inside[p1]
        pts = np.stack([q[flip] for q in p0], 1)
        o1, o2 = [(b + 1) % 3 for b in range(a, a + 2)]
        ring = []
        for d1, d2 in ((0, 0), (1, 0), (1, 1), (0, 1)):
            q = pts.copy()
            q[:, o1] -= 1 - d1
            q[:, o2] -= 1 - d2
            ring.append(index[tuple(q.T)])
        quads.append(np.stack(ring, 1))
    quads = np.concatenate(quads)
    quads = quads[(quads >= 0).all(1)]
    rng = np.random.default_rng(seed)
    rev = rng.random(len(quads)) < 0.5
    quads[rev] = quads[rev][:, ::-1]                                                # inconsistent winding
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    faces = faces[rng.random(len(faces)) > 2e-5]                                    # a few small holes
    speck = verts[:4] * 0.01 + np.float32(0.45)                                     # a floating speck
    faces = np.concatenate([faces, np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]) + len(verts)])
    verts = np.concatenate([verts, speck])
    return verts, faces.astype(np.int64), coords


class PeakRSS:
    """Sample this process's resident memory every 5 ms; .peak_mb = max growth over the start (MB)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.peak_mb = (self.peak - self.start) / 2 ** 20
        self.abs_mb = self.peak / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=400, help="grid resolution of the synthetic blob (400 -> ~1M faces)")
    ap.add_argument("--target", type=int, default=200_000, help="decimation target (faces)")
    ap.add_argument("--texture", type=int, default=2048, help="texture size")
    ap.add_argument("--device", default="cpu", help="device for baking (cpu, cuda, mps)")
    ap.add_argument("--no-project", action="store_true", help="bake at the decimated surface (no closest point)")
    args = ap.parse_args()
    logging.basicConfig(format="  log: %(message)s")
    logging.getLogger("trellis2.trellis2_core.mesh").setLevel(logging.INFO)
    dev = torch.device(args.device)
    rows = []

    def step(name, fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            t = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
        gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else float("nan")
        rows.append((name, dt, mem.peak_mb, mem.abs_mb, gpu))
        return out

    v, f, coords = step("make input (not timed work)", lambda: blob_mesh(args.res))
    mesh = Mesh.from_numpy(v, f)
    c = torch.from_numpy(coords)
    attrs = torch.cat([(c.float() + 0.5) / args.res, torch.full((len(c), 1), 0.1),
                       (c[:, :1].float() / args.res), torch.ones(len(c), 1)], 1)
    print(f"input: {mesh.num_vertices} vertices, {mesh.num_faces} faces, {len(coords)} voxels at {args.res}^3")
    repaired, rep = step("repair", lambda: repair_mesh(mesh))
    print(f"repair: {rep}")
    dec = step(f"decimate -> {args.target}", lambda: decimate(repaired, args.target))
    dec = dec.replace(normals=vertex_normals(dec.vertices, dec.faces))
    uv = step("unwrap", lambda: unwrap(dec, texture_size=args.texture))
    field = VoxelAttributeField(c.to(dev), attrs.to(dev))
    ref = None if args.no_project else repaired.to(dev)
    maps = step(f"bake {args.texture}^2" + ("" if args.no_project else " (+projection)"),
                lambda: bake_textures(uv.to(dev), field, args.res, texture_size=args.texture, reference=ref))
    out = mesh_zup_to_yup(uv.replace(maps=maps))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.glb")
        step("export GLB (PNG)", lambda: export_glb(out, path))
        size = os.path.getsize(path) / 2 ** 20
    print(f"output: {out.num_vertices} vertices, {out.num_faces} faces, GLB {size:.1f} MB; "
          f"torch threads {torch.get_num_threads()}, device {dev}")
    print("\n| step | seconds | peak RSS growth (MB) | RSS peak (MB) | CUDA peak (MB) |\n|---|---:|---:|---:|---:|")
    for name, dt, grow, absmb, gpu in rows:
        print(f"| {name} | {dt:.2f} | {grow:.0f} | {absmb:.0f} | {'-' if gpu != gpu else f'{gpu:.0f}'} |")
    total = sum(r[1] for r in rows[1:])
    print(f"| total (without input) | {total:.2f} | | | |")


if __name__ == "__main__":
    main()
