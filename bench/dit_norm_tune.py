"""Launch-parameter sweep of the fused DiT norm kernels (kernels/dit_norm/triton.py) against HBM bandwidth.

    python3 bench/dit_norm_tune.py [--m 2984 4096 8192 28240] [--full] [--reps 20]

Why: the kernels are pure streaming (every byte read once, written once), so the only figure of merit is the
effective bandwidth (bytes read + written / time) next to a plain ``torch`` copy moving the same bytes. The
launch rule (``residual_launch`` / ``rope_launch``) is a fixed function, not an autotuner (deterministic and
CUDA-graph capturable); this script shows how far it is from the best of the grid BLOCK_M (rows per program;
for RoPE head rows BLOCK_R = 8..128) x num_warps (2, 4, 8), and checks every variant: bitwise against the
heuristic's output ("bits" = fraction of differing values; only the fp32 LN / head-norm summation order may
differ between launches) and against reference.py with the CUDA tests' tolerances ("ref" ok/FAIL).

Cases (bf16, x [M, 1536], vectors [1, 1, C] per item as in the DiT blocks):
  a  shift+scale, no y          (norm1 of the self-attention / mlp branch input)
  b  y+gate, affine LN w/b      (gated residual, then norm2)
  c  y+shift+scale, no gate
  d  y+gate, norm=False         (the last gated residual)
  rope / rope0  q = qkv[:, 0] of qkv [M, 3, 12, 128] (strided rows), with / without phases [M, 64] complex64
Run from the repo root with the package importable as ``trellis2``; CUDA only; < 60 s on an H100 (cold
Triton cache included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import graph_time  # noqa: E402

from trellis2.kernels.dit_norm import reference as R  # noqa: E402
from trellis2.kernels.dit_norm import triton as T  # noqa: E402

TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # = tests/test_kernels_dit_norm.py
MISMATCH = {torch.float32: 1.0, torch.float16: 0.02, torch.bfloat16: 0.02}
WARPS = (2, 4, 8)
BLOCK_M = (1, 2, 4, 8, 16)
BLOCK_R = (8, 16, 32, 64, 128)
C, H, D = 1536, 12, 128


def cuda_us(fn, reps, inner=10):
    """Median microseconds of one fn call, timed inside a CUDA graph (``_timing.graph_time``: eager event timings
    would measure Triton's ~20-40 us launcher, more than these kernels take at 4k rows)."""
    return graph_time(fn, reps=reps, inner=inner) * 1e6


def ref_ok(out, want):
    """The CUDA tests' check: relative-norm error and fraction of non-identical values."""
    for o, w in zip(out, want):
        if w is None:
            continue
        err = ((o.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
        if err > TOL[w.dtype] or (o != w).float().mean().item() > MISMATCH[w.dtype]:
            return False
    return True


def bits(out, base):
    return max((o != b).float().mean().item() for o, b in zip(out, base) if b is not None)


def residual_cases(m, dt, g):
    """name -> (kwargs of residual_norm, bytes moved)."""
    x, y = (torch.randn(1, m, C, generator=g).cuda().to(dt) for _ in range(2))
    shift, scale, gate = torch.randn(1, 6 * C, generator=g).cuda().to(dt).unsqueeze(1).chunk(6, dim=-1)[:3]
    w, b = torch.randn(C, generator=g).cuda(), torch.randn(C, generator=g).cuda()
    t = x.numel() * x.element_size()
    return {
        "a": (dict(x=x, shift=shift, scale=scale), 2 * t),
        "b": (dict(x=x, y=y, gate=gate, weight=w, bias=b), 4 * t),
        "c": (dict(x=x, y=y, shift=shift, scale=scale), 4 * t),
        "d": (dict(x=x, y=y, gate=gate, norm=False), 3 * t),
    }


def rope_cases(m, dt, g):
    qkv = (torch.randn(m, 3, H, D, generator=g) * 3).cuda().to(dt)
    q = qkv[:, 0]
    gamma = (torch.rand(H, D, generator=g) + 0.5).cuda()
    ph = torch.polar(torch.ones(m, D // 2), torch.rand(m, D // 2, generator=g) * 6.283).cuda()
    t = q.numel() * q.element_size()
    return {"rope": ((q, gamma, ph), 2 * t + ph.numel() * 8), "rope0": ((q, gamma, None), 2 * t)}


def sweep(name, m, run, ref, launch, blocks, width, nbytes, copy_gbs, reps, full, rows):
    """Time every (block, warps) variant of one case; append one summary row (and all rows with --full)."""
    pick = launch
    base = run(*pick)
    want = ref()
    res = {}
    for bm, nw in sorted({(b, w) for b in blocks for w in WARPS} | {pick}):
        if bm * width > 64 * 32 * nw and (bm, nw) != pick:
            continue  # > 64 fp32 values per thread and tensor: spills registers, slow to compile and to run
        out = run(bm, nw)
        us = cuda_us(lambda: run(bm, nw), reps)  # noqa: B023 (called at once)
        res[(bm, nw)] = (us, nbytes / us / 1e3, bits(out, base), ref_ok(out, want))
        if full:
            r = res[(bm, nw)]
            mark = "*" if (bm, nw) == pick else " "
            print(f"  {name:5s} M={m:6d} {mark}bm={bm:3d} w={nw}  {r[0]:8.1f} us {r[1]:7.0f} GB/s "
                  f"bits {r[2]:.1e} ref {'ok' if r[3] else 'FAIL'}")  # fmt: skip
    best = min(res, key=lambda k: res[k][0])
    h_us = res[pick][0]
    rows.append((name, m, nbytes / 1e6, copy_gbs, pick, h_us, nbytes / h_us / 1e3, best, res[best][0],
                 res[best][1], max(r[2] for r in res.values()), all(r[3] for r in res.values()),
                 ref_ok(base, want)))  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2984, 4096, 8192, 28240])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--full", action="store_true", help="print every variant, not only the summary")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    t0 = time.time()
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in args.m:
        for name, (kw, nb) in residual_cases(m, dt, g).items():
            src = torch.empty(nb // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy_gbs = nb / cuda_us(lambda: dst.copy_(src), args.reps) / 1e3  # noqa: B023
            kw = dict(kw)
            x, y, gate = kw.pop("x"), kw.pop("y", None), kw.pop("gate", None)

            def run(bm, nw, x=x, y=y, gate=gate, kw=kw):
                return T.residual_norm(x, y, gate, block_m=bm, num_warps=nw, **kw)

            def ref(x=x, y=y, gate=gate, kw=kw):
                return R.residual_norm(x, y, gate, **kw)

            launch = T.residual_launch(C, m, dt)
            sweep(name, m, run, ref, launch, BLOCK_M, 2048, nb, copy_gbs, args.reps, args.full, rows)
        for name, (a, nb) in rope_cases(m, dt, g).items():
            src = torch.empty(nb // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy_gbs = nb / cuda_us(lambda: dst.copy_(src), args.reps) / 1e3  # noqa: B023

            def run(br, nw, a=a):
                return (T.rms_norm_rope(*a, block_r=br, num_warps=nw),)

            def ref(a=a):
                return (R.rms_norm_rope(*a),)

            sweep(name, m, run, ref, T.rope_launch(H, D, m), BLOCK_R, D, nb, copy_gbs, args.reps, args.full, rows)
    # CUDA-graph capture of the heuristic launch (no autotuning: capturable once compiled)
    kw, _ = residual_cases(1024, dt, g)["b"]
    eager = T.residual_norm(kw["x"], kw["y"], kw["gate"], weight=kw["weight"], bias=kw["bias"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = T.residual_norm(kw["x"], kw["y"], kw["gate"], weight=kw["weight"], bias=kw["bias"])
    graph.replay()
    torch.cuda.synchronize()
    graph_ok = all(torch.equal(a, b) for a, b in zip(eager, cap))

    print(f"\n{torch.cuda.get_device_name()}  bf16  C={C}  H={H} D={D}  median of {args.reps}  (GB/s = bytes read+"
          f"written / time; copy = torch copy of the same bytes)")  # fmt: skip
    print(f"{'case':5s} {'M':>6s} {'MB':>6s} {'copy':>6s} | {'heuristic (bm,w)':>17s} {'us':>7s} {'GB/s':>6s} "
          f"{'%copy':>5s} | {'best (bm,w)':>12s} {'us':>7s} {'GB/s':>6s} | {'bits':>7s} ref")  # fmt: skip
    for name, m, mb, cg, pick, hus, hg, best, bus, bg, mm, allok, hok in rows:
        print(f"{name:5s} {m:6d} {mb:6.1f} {cg:6.0f} | {str(pick):>17s} {hus:7.1f} {hg:6.0f} {100 * hg / cg:5.0f} | "
              f"{str(best):>12s} {bus:7.1f} {bg:6.0f} | {mm:7.1e} {'ok' if allok and hok else 'FAIL'}")  # fmt: skip
    print(f"CUDA graph capture of residual_norm: {'bit-identical to eager' if graph_ok else 'MISMATCH'}; "
          f"total {time.time() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
