"""Attention inside one HR SLat forward against the same SDPA calls alone, and the matrix rate in bursts vs sustained.

    python3 bench/situ_probe.py

The guided pair as the sampler runs it (B=2, item 1's context all zero), full-size shape_slat_flow_model_1024 with
random weights at ~12.7k tokens: its attention kernel time (profiler) per call signature next to the same call
timed alone in bursts of 10 and sustained for ~0.5 s. H100 (bench/RESULTS.md, session 9): the forward's attention
ran as fast as the kernel alone under sustained load; the gap to burst rates is the clock at the power limit.
Run from the repo root with the package importable as ``trellis2``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402
from _timing import cuda_time, graph_time, kernel_totals  # noqa: E402
from dit_probe import CTX, family  # noqa: E402

from trellis2.trellis2_core.sparse import SparseTensor  # noqa: E402


def main() -> None:
    """Attention inside one HR SLat forward (the guided pair as the sampler runs it: B=2, item 1's context all
    zero) against the same calls alone: per call signature (shape, strides), the in-forward kernel time (profiler)
    next to the same SDPA call timed alone on tensors of that layout, in bursts of 10 and sustained for ~0.5 s.
    A gap between them that the layout does not explain points at clocks (see the matmul rows: burst vs
    sustained)."""
    from trellis2.trellis2_core.nn import attention as A

    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}", flush=True)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for reps in (20, 400):
        t = cuda_time(lambda: torch.mm(a, a), reps=reps, warm=5)
        print(f"# mm 8192^3 bf16, {reps} back-to-back: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s (median)", flush=True)
    del a
    sl = M.build("shape_slat_flow_model_1024", dev)
    c1 = M.shell_coords(64, 0.376, 0.0, dev)
    coords = M.batched(c1, 2)
    xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
    t, cond = torch.full((2,), 800.0, device=dev), torch.randn(2, 4101, CTX, device=dev)
    cond[1] = 0
    fwd = lambda: sl(xs, t, cond, zero_cond_from=1)  # noqa: E731
    seen: dict = {}
    original = A.scaled_dot_product_attention

    def record(q, k, v, **kw):
        key = tuple((tuple(x.shape), tuple(x.stride())) for x in (q, k, v))
        seen.setdefault(key, [0, None])[0] += 1
        return original(q, k, v, **kw)

    A.scaled_dot_product_attention = record
    try:
        with torch.no_grad():
            fwd()
    finally:
        A.scaled_dot_product_attention = original
    with torch.no_grad():
        for _ in range(2):
            fwd()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        graphed = graph_time(fwd, reps=5)
    busy, rows = kernel_totals(prof)
    print(f"\n## in one HR SLat forward ({c1.shape[0]} tokens, B=2, item 1 zero context): busy {busy:.1f} ms, "
          f"graph replay {graphed * 1e3:.1f} ms", flush=True)
    fams = defaultdict(float)
    for name, n, ms in rows:
        fams[family(name)] += ms
    print("  by family: " + " ".join(f"{k}={v:.1f}" for k, v in sorted(fams.items(), key=lambda kv: -kv[1])))
    for name, n, ms in rows:
        if family(name) == "attention":
            print(f"  {ms:8.2f} ms x{n:<4d} ({ms / n:.3f} ms/call) {name[:100]}")
    print("\n## the same SDPA calls alone (ms per call; TFLOP/s)")
    print(f"{'q shape/strides':<44} {'k/v (strides)':<44} {'calls':>5} {'burst':>14} {'sustained':>14}  kernel")
    with torch.no_grad():
        for key, (calls, _) in seen.items():
            q, k, v = (torch.empty_strided(sh, st, device=dev, dtype=torch.bfloat16).normal_() for sh, st in key)
            flops = 4.0 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] * q.shape[3]
            fn = lambda q=q, k=k, v=v: original(q, k, v)  # noqa: E731
            burst = cuda_time(fn, reps=10, warm=3)
            sustained = cuda_time(fn, reps=max(10, int(0.5 / burst)), warm=3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p2:
                fn()
                torch.cuda.synchronize()
            names = ",".join(sorted({r[0][:40] for r in kernel_totals(p2)[1]}))
            print(f"{str(key[0]):<44} {str(key[1][1]) + '/' + str(key[2][1]):<44} {calls:5d} "
                  f"{burst * 1e3:7.3f} ({flops / burst / 1e12:4.0f}) {sustained * 1e3:7.3f} ({flops / sustained / 1e12:4.0f})  "
                  f"{names}", flush=True)
    del sl
    torch.cuda.empty_cache()



if __name__ == "__main__":
    main()
