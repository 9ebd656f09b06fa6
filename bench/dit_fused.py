"""Before/after of the fused DiT norm epilogues (kernels/dit_norm) and, optionally, torch.compile of the blocks.

    python3 bench/dit_fused.py [--tokens 4096 12512 47000] [--compile 4096] [--log FILE]
    python3 bench/dit_fused.py --diag     # rounding parity of the residual_norm kernel, per stage

Full-size SLat shape flow (slat_flow_img2shape_dit_1_3B_1024_bf16, random weights) at batch 1 and the dense
SS flow (B = 2 guidance pair, 4096 tokens), bf16 on CUDA. Variants, all on the same weights and inputs:
  torch   : TRELLIS2_DIT_NORM_BACKEND=torch, the reference op sequence (the "before")
  triton  : the fused Triton epilogues (the "after"; what "auto" picks on CUDA bf16)
  compile : torch.compile of each block (reference ops, Inductor fuses them), only at the --compile sizes
Per row: ms per forward (median of CUDA-event timings after warm-up), kernel launches and summed kernel time of
one forward (profiler), rel. difference of the output vs the torch variant. Run from the repo root with the
package importable as ``trellis2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_time  # noqa: E402
from dit_forward import build, sparse_input  # noqa: E402

from trellis2.kernels import dit_norm  # noqa: E402
from trellis2.trellis2_core.nn.transformer import compile_blocks  # noqa: E402


def cuda_ms(fn, reps=5, warm=2):
    return cuda_time(fn, reps=reps, warm=warm) * 1e3


def kernels(fn):
    """(launches, summed kernel ms) of one call."""
    torch.cuda.synchronize()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(evs), sum(e.device_time for e in evs) / 1e3
    except Exception as e:  # the profiler is a diagnostic here; timing rows still count
        print(f"(profiler failed: {e})", flush=True)
        return -1, float("nan")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def variant(name):
    if name == "compile":
        return compile_blocks("default")
    return dit_norm.use_backend(name)


def run_case(label, tokens, fn, out_of, names, rows, reps):
    ref = None
    for name in names:
        with variant(name):
            t0 = time.perf_counter()
            out = out_of(fn())  # first call: compiles (triton JIT / inductor)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = cuda_ms(fn, reps=reps)
            n_k, k_ms = kernels(fn)
        ref = out if ref is None else ref
        err = rel(out, ref)
        row = dict(model=label, tokens=tokens, variant=name, ms=ms, launches=n_k, kernel_ms=k_ms, rel_vs_torch=err,
                   first_call_s=first)  # fmt: skip
        rows.append(row)
        print(f"{label:<8} {tokens:6d} {name:<8} {ms:9.2f} {n_k:8d} {k_ms:9.2f} {err:10.2e} {first:8.1f}", flush=True)


def diag():
    """Fraction of outputs differing from the reference, per epilogue stage, for both rounding styles of the
    residual_norm kernel (dtype casts vs integer rounding of the float32 bits)."""
    from trellis2.kernels.dit_norm import reference
    from trellis2.kernels.dit_norm import triton as tri

    print(f"{'dtype':<9} {'round':<5} {'LN':>8} {'LN*s':>8} {'LN*s+t':>8} {'affine':>8} {'x+y*g':>8}")
    for dt in (torch.bfloat16, torch.float16):
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y = (torch.randn(2, 4096, 1536, device="cuda", generator=g).to(dt) for _ in range(2))
        sh, sc, ga = torch.randn(2, 6 * 1536, device="cuda", generator=g).to(dt).unsqueeze(1).chunk(6, -1)[:3]
        w, b = torch.randn(1536, device="cuda", generator=g), torch.randn(1536, device="cuda", generator=g)
        cases = [dict(), dict(scale=sc), dict(scale=sc, shift=sh), dict(weight=w, bias=b)]
        for bits in (False, True):
            tri.ROUND_BITS = bits
            fr = [(tri.residual_norm(x, **kw)[1] != reference.residual_norm(x, **kw)[1]).float().mean().item()
                  for kw in cases]  # fmt: skip
            fr.append((tri.residual_norm(x, y, ga, norm=False)[0] != x + y * ga).float().mean().item())
            print(f"{str(dt)[6:]:<9} {'bits' if bits else 'cast':<5} " + " ".join(f"{f:8.2%}" for f in fr))
        tri.ROUND_BITS = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 12512, 47000])
    ap.add_argument("--compile", type=int, nargs="*", default=[], help="token counts that also time torch.compile")
    ap.add_argument("--no-ss", action="store_true")
    ap.add_argument("--log", default=None)
    ap.add_argument("--diag", action="store_true", help="only the rounding diagnostics of the residual_norm kernel")
    args = ap.parse_args()
    if args.diag:
        return diag()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print(f"{'model':<8} {'tokens':>6} {'variant':<8} {'ms/fwd':>9} {'launches':>8} {'kern_ms':>9} {'rel_vs_t':>10} "
          f"{'first_s':>8}", flush=True)  # fmt: skip
    rows = []
    with torch.no_grad():
        if not args.no_ss:
            ss = build("ss_flow_img_dit_1_3B_64_bf16", dev)
            x, t = torch.randn(2, 8, 16, 16, 16, device=dev), torch.tensor([800.0, 800.0], device=dev)
            cond = torch.randn(2, 1029, 1024, device=dev)
            names = ["torch", "triton"] + (["compile"] if 4096 in args.compile else [])
            run_case("ss_flow", 4096, lambda: ss(x, t, cond), lambda o: o, names, rows, reps=10)
            del ss
            torch.cuda.empty_cache()
        sl = build("slat_flow_img2shape_dit_1_3B_1024_bf16", dev)
        t1, cond1 = torch.tensor([800.0], device=dev), torch.randn(1, 4101, 1024, device=dev)
        for n in args.tokens:
            x1 = sparse_input([n], 96, 32)
            names = ["torch", "triton"] + (["compile"] if n in args.compile else [])
            run_case("slat", n, lambda: sl(x1.replace(x1.feats), t1, cond1), lambda o: o.feats, names, rows,
                     reps=5 if n < 20000 else 3)  # fmt: skip
    if args.log:
        with open(args.log, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\n## summary (ms per forward)")
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["tokens"]), {})[r["variant"]] = r["ms"]
    for (m, n), v in by.items():
        extra = "".join(f"  {k} {ms:.1f} ({v['torch'] / ms:.2f}x)" for k, ms in v.items() if k != "torch")
        print(f"{m:<8} {n:6d}  torch {v['torch']:.1f}{extra}")


if __name__ == "__main__":
    main()
