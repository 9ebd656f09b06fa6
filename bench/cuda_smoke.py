"""CUDA smoke run on the tiny snapshot: determinism, CUDA vs CPU fp32, released precision, CLI to GLB.

    python bench/cuda_smoke.py OUTDIR      (needs a CUDA GPU; prints a table)
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trellis2.trellis2_core.cli import main as cli
from trellis2.trellis2_core.pipeline import Trellis2Pipeline
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

out = Path(sys.argv[1])
snap = write_tiny_snapshot(out / "tiny", overwrite=True)
rgba = np.zeros((96, 80, 4), np.uint8)
rgba[20:70, 15:60] = (200, 60, 30, 255)
image = Image.fromarray(rgba, "RGBA")
image.save(out / "object.png")
fast = {s: {"steps": 4} for s in ("sparse_structure", "shape_slat", "tex_slat")}
# Parity in fp32: cuDNN convolutions default to TF32 on Ampere+, which flips near-threshold occupancy decisions.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def ball(resolution, radius):
    r = torch.arange(resolution, dtype=torch.float32) + 0.5 - resolution / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    from trellis2.trellis2_core.pipeline import Structure

    return Structure(coords=torch.argwhere(((x**2 + y**2 + z**2) <= radius**2)[None]).int(), resolution=resolution)


def run(device, dtype, pt, structure=None):
    pipe = Trellis2Pipeline.from_pretrained(snap, device=device, dtype=dtype, allow_download=False)
    t = time.perf_counter()
    g = pipe.generate(image, seed=5, pipeline_type=pt, sampler_overrides=fast, structure=structure)
    return g, time.perf_counter() - t


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


print(f"{'pipeline':14s} {'check':38s} result")
for pt in ("512", "1024_cascade"):
    a, ta = run("cuda", torch.float32, pt)
    b, _ = run("cuda", torch.float32, pt)
    c, tc = run("cpu", torch.float32, pt)
    h, th = run("cuda", None, pt)  # released precision: bf16 DiT blocks, fp16 VAE blocks
    fa, _ = run("cuda", torch.float32, pt, ball(32, 3.0))  # forced structure: compare the later stages exactly
    fc, _ = run("cpu", torch.float32, pt, ball(32, 3.0))
    print(f"{pt:14s} {'forced structure: latent coords equal':38s} {torch.equal(fa.shape.latent.coords.cpu(), fc.shape.latent.coords.cpu())}")
    if torch.equal(fa.shape.latent.coords.cpu(), fc.shape.latent.coords.cpu()):
        print(f"{pt:14s} {'forced: shape latent rel err cuda/cpu':38s} {rel(fa.shape.latent.feats, fc.shape.latent.feats):.2e}")
        print(f"{pt:14s} {'forced: material latent rel err':38s} {rel(fa.material.latent.feats, fc.material.latent.feats):.2e}")
        print(f"{pt:14s} {'forced: decoded voxels equal':38s} {torch.equal(fa.ovoxel.coords.cpu(), fc.ovoxel.coords.cpu())}")
    same = torch.equal(a.shape.latent.feats, b.shape.latent.feats) and torch.equal(a.ovoxel.attributes, b.ovoxel.attributes)
    print(f"{pt:14s} {'cuda fp32 twice, same seed: identical':38s} {same}")
    print(f"{pt:14s} {'structure coords cuda == cpu':38s} {torch.equal(a.structure.coords.cpu(), c.structure.coords.cpu())}")
    if torch.equal(a.shape.latent.coords.cpu(), c.shape.latent.coords.cpu()):
        print(f"{pt:14s} {'shape latent rel err cuda vs cpu fp32':38s} {rel(a.shape.latent.feats, c.shape.latent.feats):.2e}")
        print(f"{pt:14s} {'material latent rel err cuda vs cpu':38s} {rel(a.material.latent.feats, c.material.latent.feats):.2e}")
    else:
        print(f"{pt:14s} {'shape latent coords cuda == cpu':38s} False")
    print(f"{pt:14s} {'decoded voxels cuda / cpu / bf16':38s} {a.ovoxel.num_voxels} / {c.ovoxel.num_voxels} / {h.ovoxel.num_voxels}")
    print(f"{pt:14s} {'released precision finite attributes':38s} {bool(torch.isfinite(h.ovoxel.attributes).all())}")
    print(f"{pt:14s} {'seconds cuda fp32 / cpu / cuda bf16':38s} {ta:.2f} / {tc:.2f} / {th:.2f}")
code = cli(["generate", str(out / "object.png"), "-o", str(out / "object.glb"), "--weights", str(snap), "--offline",
            "--device", "cuda", "--pipeline", "512", "--steps", "4", "--texture-size", "512", "-q"])  # fmt: skip
print(f"{'cli':14s} {'generate --device cuda -> GLB':38s} exit {code}, {(out / 'object.glb').stat().st_size} bytes")
