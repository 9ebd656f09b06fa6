"""Where the DiT's GPU time goes on this GPU: SDPA backends, GEMM rates, eager vs CUDA-graph forwards, kernel mix.

    python3 bench/dit_probe.py [--skip sdpa gemm fp8 mlp forward] [--kernels] [--layout]

Tables (full-size models from the manifests, random weights, token counts of bench_pipeline's shells):
  sdpa     TFLOP/s of F.scaled_dot_product_attention per backend (flash / cudnn / efficient), self and cross shapes;
  gemm     TFLOP/s of the DiT's Linear shapes (bf16, torch.nn.functional.linear) at its token counts;
  fp8      row-wise FP8 GEMMs against bf16 (speed-up, with and without quantising x in torch; error);
  mlp      the MLP with its GELU as a kernel of its own vs in cuBLASLt's epilogue;
  forward  one flow-model forward: eager ms, CUDA-graph replay ms, sum of kernel times (profiler) and its split
           by kernel family, TFLOP/s of the eager and graphed forward against a bf16 mm ceiling from the same run;
  kernels  the heaviest kernels of an SS and an HR SLat forward;
  layout   cuDNN attention per q/k/v memory layout, alone and inside forwards;
  fp8-forward  the engine's fp8 option (nn/fp8.py) on one forward: CUDA-graph ms bf16 vs fp8, and each output's
           relative error against the same model in float32.
Attention inside a forward against the same calls alone (clocks under sustained load): bench/situ_probe.py.
Host-side costs (captures, first calls, launches) are bench/host_probe.py's.
Run from the repo root with the package importable as ``trellis2``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402
from _timing import cuda_time, graph_time, kernel_totals, matmul_ceiling  # noqa: E402

from trellis2.trellis2_core.sparse import SparseTensor  # noqa: E402

C, H, D, CTX = 1536, 12, 128, 1024
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def sdpa_table(ceil: float) -> None:
    print(f"\n## SDPA bf16, H={H}, D={D} (TFLOP/s; % of mm ceiling in brackets)")
    print(f"{'B':>2} {'Lq':>6} {'Lk':>6} " + " ".join(f"{n:>14}" for n in SDPA))
    for b, lq, lk in [(1, 2984, 2984), (2, 2984, 2984), (2, 4096, 4096), (1, 12512, 12512), (2, 12512, 12512),
                      (2, 46624, 46624), (2, 4096, 1029), (2, 12512, 4101), (2, 46624, 4101)]:  # fmt: skip
        q = torch.randn(b, H, lq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, H, lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops, cells = 4.0 * b * H * lq * lk * D, []
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()) if lq * lk <= 12512 * 12512 else None
        for name, be in SDPA.items():
            try:
                with sdpa_kernel([be]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), reps=5 if lq > 20000 else 10)
                err = "" if ref is None else f" e{((out.float() - ref).norm() / ref.norm()).item():.0e}"
                cells.append(f"{flops / t / 1e12:6.0f} ({100 * flops / t / 1e12 / ceil:2.0f}%){err}")
            except RuntimeError as e:
                cells.append(f"{'n/a':>14}")
                print(f"   {name}: {str(e).splitlines()[0][:100]}")
        print(f"{b:2d} {lq:6d} {lk:6d} " + " ".join(f"{c:>14}" for c in cells), flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()


def gemm_table(ceil: float) -> None:
    print("\n## Linear bf16 (x [M, K] @ W^T [K, N] + bias), TFLOP/s")
    shapes = [(C, 3 * C), (C, C), (C, 8192), (8192, C), (CTX, 2 * C)]
    print(f"{'M':>6} " + " ".join(f"{f'{k}->{n}':>11}" for k, n in shapes))
    for m in [2984, 4096, 5968, 8192, 12512, 25024, 93248]:
        cells = []
        for k, n in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w, bias = torch.randn(n, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda", dtype=torch.bfloat16)
            t = cuda_time(lambda: F.linear(x, w, bias), reps=20, warm=3)
            cells.append(f"{2 * m * k * n / t / 1e12:5.0f} ({100 * 2 * m * k * n / t / 1e12 / ceil:2.0f}%)")
        print(f"{m:6d} " + " ".join(f"{c:>11}" for c in cells), flush=True)


def fp8_table() -> None:
    """What FP8 (e4m3, row-wise scales, torch._scaled_mm) would buy the DiT GEMMs: speed-up over bf16 F.linear for
    the GEMM alone and with a plain-torch row quantisation of x, and the relative error of the result."""
    f8 = torch.float8_e4m3fn
    print("\n## FP8 row-wise GEMM vs bf16 (speed-up x; q = including x's row quantisation in torch; e = rel. error)")
    shapes = [(C, 3 * C), (C, C), (C, 8192), (8192, C)]
    print(f"{'M':>6} " + " ".join(f"{f'{k}->{n}':>22}" for k, n in shapes))

    def quant(v):
        s = v.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
        return (v.float() / s).to(f8), s

    for m in [2984, 5968, 12512, 25024, 93248]:
        cells = []
        for k, n in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            wq, ws = quant(w)
            xq, xs = quant(x)
            def mm(a=xq, sa=xs, wq=wq, ws=ws, bias=bias):
                return torch._scaled_mm(a, wq.t(), scale_a=sa, scale_b=ws.t(), bias=bias, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)  # fmt: skip

            def full(x=x):
                return mm(*quant(x))

            try:
                t16 = cuda_time(lambda: F.linear(x, w, bias), reps=20, warm=3)
                t8, t8q = cuda_time(mm, reps=20, warm=3), cuda_time(full, reps=20, warm=3)
                ref = F.linear(x.float(), w.float(), bias.float())
                err = ((mm().float() - ref).norm() / ref.norm()).item()
                cells.append(f"{t16 / t8:4.2f}x q{t16 / t8q:4.2f}x e{err:.0e}")
            except RuntimeError as e:
                cells.append(f"{'n/a':>22}")
                print(f"   fp8: {str(e).splitlines()[0][:120]}")
        print(f"{m:6d} " + " ".join(f"{c:>22}" for c in cells), flush=True)


FAMILIES = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")), ("attention", ("flash", "fmha", "attention", "cudnn")),
            ("triton", ("triton", "_residual", "_rms")), ("elementwise", ("elementwise", "vectorized", "reduce", "copy", "cat"))]  # fmt: skip


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def forward_case(label: str, model, args, flops: float, ceil: float) -> None:
    fn = lambda: model(*args)  # noqa: E731
    with torch.no_grad():
        eager = cuda_time(fn, reps=10, warm=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        fam, kernels = defaultdict(float), 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                fam[family(e.name)] += e.device_time / 1e3
                kernels += 1
        busy = sum(fam.values())
        graphed = graph_time(fn, reps=10)
    split = " ".join(f"{k}={v:.1f}" for k, v in sorted(fam.items(), key=lambda kv: -kv[1]))
    print(f"{label:<28} {kernels:6d} {eager * 1e3:8.2f} {graphed * 1e3:8.2f} {busy:8.2f} "
          f"{flops / eager / 1e12:7.0f} {flops / graphed / 1e12:7.0f} {100 * flops / graphed / 1e12 / ceil:5.1f}  {split}",
          flush=True)  # fmt: skip


def forward_table(ceil: float) -> None:
    dev = torch.device("cuda")
    print("\n## flow forward (ms; busy = sum of kernel times; TF/s = counted matrix FLOPs / time)")
    print(f"{'case':<28} {'kern':>6} {'eager':>8} {'graph':>8} {'busy':>8} {'TF/s_e':>7} {'TF/s_g':>7} {'%ceil':>5}  kernel ms by family")
    counter = M.FlopCounter()

    def case(label, model, args):  # one counted call gives the FLOPs, then forward_case times it
        f0 = counter.flops
        with torch.no_grad():
            model(*args)
        forward_case(label, model, args, counter.flops - f0, ceil)

    ss = M.build("sparse_structure_flow_model", dev)
    counter.attach(ss)
    for b in (1, 2):
        x, t = torch.randn(b, 8, 16, 16, 16, device=dev), torch.full((b,), 800.0, device=dev)
        case(f"ss_flow 4096 B={b}", ss, (x, t, torch.randn(b, 1029, CTX, device=dev)))
    del ss
    torch.cuda.empty_cache()
    sl = M.build("shape_slat_flow_model_512", dev)
    counter.attach(sl)
    for grid, rho, n_cond in [(32, 0.36, 1029), (64, 0.40, 4101)]:
        coords1 = M.shell_coords(grid, rho, 0.0, dev)
        for b in (1, 2):
            coords = M.batched(coords1, b)
            x = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
            t, cond = torch.full((b,), 800.0, device=dev), torch.randn(b, n_cond, CTX, device=dev)
            case(f"slat {coords1.shape[0]} B={b}", sl, (x, t, cond))
    del sl
    torch.cuda.empty_cache()


def kernel_table(top: int = 18) -> None:
    """The heaviest kernels of one forward (profiler, eager call after a warm-up), for the SS flow's guided pair and
    an HR SLat pair: where the time that is not matrix products goes."""
    dev = torch.device("cuda")
    cases = []
    ss = M.build("sparse_structure_flow_model", dev)
    x, t = torch.randn(2, 8, 16, 16, 16, device=dev), torch.full((2,), 800.0, device=dev)
    cases.append(("ss_flow 4096 B=2", ss, (x, t, torch.randn(2, 1029, CTX, device=dev))))
    sl = M.build("shape_slat_flow_model_1024", dev)
    c1 = M.shell_coords(64, 0.40, 0.0, dev)
    coords = M.batched(c1, 2)
    xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
    cases.append((f"slat {c1.shape[0]} B=2", sl, (xs, t, torch.randn(2, 4101, CTX, device=dev))))
    for label, model, args in cases:
        with torch.no_grad():
            for _ in range(3):
                model(*args)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(*args)
                torch.cuda.synchronize()
        busy, rows = kernel_totals(prof)
        print(f"\n## kernels of one {label} forward: busy {busy:.2f} ms (top {top})")
        for name, n, ms in rows[:top]:
            print(f"  {ms:8.3f} ms {100 * ms / busy:5.1f}% x{n:<5d} {name[:110]}")
    del ss, sl
    torch.cuda.empty_cache()


def mlp_table(ceil: float) -> None:
    """The DiT MLP (C -> 8192, GELU tanh, -> C) with the GELU as its own kernel vs in cuBLASLt's epilogue."""
    print("\n## MLP 1536->8192->1536 bf16: ms (GELU separate | GELU epilogue), rel. error vs fp32")
    w1, w2 = (torch.randn(8192, C, device="cuda", dtype=torch.bfloat16) / C**0.5,
              torch.randn(C, 8192, device="cuda", dtype=torch.bfloat16) / 8192**0.5)  # fmt: skip
    b1, b2 = (torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1 for n in (8192, C))
    for m in (2984, 5968, 8192, 25024, 93248):
        x = torch.randn(m, C, device="cuda", dtype=torch.bfloat16)
        sep = lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)  # noqa: E731
        fused = lambda: F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2)  # noqa: E731
        ref = F.linear(F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh"), w2.float(), b2.float())
        t1, t2 = graph_time(sep, reps=10), graph_time(fused, reps=10)
        e1, e2 = (((f().float() - ref).norm() / ref.norm()).item() for f in (sep, fused))
        print(f"{m:6d} {1e3 * t1:8.3f} {1e3 * t2:8.3f}  ({t1 / t2:4.2f}x)  e {e1:.1e} {e2:.1e}", flush=True)


def layout_table() -> None:
    """Does cuDNN attention care how q/k/v are laid out? graph-timed ms per call of: contiguous [B, H, L, D] inputs
    (the sdpa table's case); the DiT's own layout (q, k [B, L, H, D] from the RMSNorm+RoPE kernel, v a strided slice
    of the fused qkv (or kv) projection, output viewed back to [B, L, C]); the same with v made contiguous first; and
    everything copied to [B, H, L, D] first (copies counted)."""
    print("\n## attention layout (cuDNN, bf16, graph-timed ms per call; TFLOP/s in brackets)")
    print(f"{'case':<22} {'bhld':>14} {'dit':>14} {'dit v-contig':>14} {'copy->bhld':>14}")
    for b, lq, lk, cross in [(1, 2984, 2984, 0), (2, 2984, 2984, 0), (2, 4096, 4096, 0), (1, 12512, 12512, 0),
                             (2, 12512, 12512, 0), (2, 4096, 1029, 1), (2, 2984, 1029, 1), (2, 12512, 4101, 1),
                             (1, 12512, 4101, 1)]:  # fmt: skip
        bf = dict(device="cuda", dtype=torch.bfloat16)
        qh, kh, vh = torch.randn(b, H, lq, D, **bf), torch.randn(b, H, lk, D, **bf), torch.randn(b, H, lk, D, **bf)
        if cross:
            q = torch.randn(b, lq, H, D, **bf)
            k, v = torch.randn(b, lk, 2, H, D, **bf).unbind(2)
        else:
            q, k = torch.randn(b, lq, H, D, **bf), torch.randn(b, lk, H, D, **bf)
            v = torch.randn(b, lk, 3, H, D, **bf)[:, :, 2]
        sd = F.scaled_dot_product_attention
        fns = {
            "bhld": lambda: sd(qh, kh, vh),
            "dit": lambda: sd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(-2),
            "vc": lambda: sd(q.transpose(1, 2), k.transpose(1, 2), v.contiguous().transpose(1, 2)).transpose(1, 2).flatten(-2),
            "copy": lambda: sd(*(t.transpose(1, 2).contiguous() for t in (q, k, v))).transpose(1, 2).flatten(-2),
        }
        flops, cells = 4.0 * b * H * lq * lk * D, []
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = fns["bhld"]()
            for fn in fns.values():
                try:
                    t = graph_time(fn, reps=10)
                    cells.append(f"{1e3 * t:6.2f} ({flops / t / 1e12:4.0f})")
                except RuntimeError as e:
                    cells.append(f"{'n/a':>14}")
                    print(f"   {str(e).splitlines()[0][:100]}")
            out = fns["dit"]()
            print(f"   dit output strides {tuple(out.stride())} contiguous {out.is_contiguous()}; "
                  f"sdpa(bhld) out contiguous {ref.is_contiguous()}")
        label = f"{'cross' if cross else 'self'} B={b} {lq}x{lk}"
        print(f"{label:<22} " + " ".join(f"{c:>14}" for c in cells), flush=True)
        del qh, kh, vh, q, k, v, ref
        torch.cuda.empty_cache()


def layout_forward_table() -> None:
    """Forward-level check of the layout table: graph-timed ms of an SS (4096, B=2) and an HR SLat (B=2) forward with
    the DiT's attention as it is, with v made contiguous before SDPA, and with q/k/v copied to [B, H, L, D]."""
    from trellis2.trellis2_core.nn import attention as A

    dev = torch.device("cuda")
    orig = A.scaled_dot_product_attention

    def vcontig(q, k, v, *, backend=None):
        return orig(q, k, v.contiguous(), backend=backend)

    def bhld(q, k, v, *, backend=None):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    ss = M.build("sparse_structure_flow_model", dev)
    t = torch.full((2,), 800.0, device=dev)
    cases = [("ss_flow 4096 B=2", ss, (torch.randn(2, 8, 16, 16, 16, device=dev), t, torch.randn(2, 1029, CTX, device=dev)))]
    sl = M.build("shape_slat_flow_model_1024", dev)
    for grid, rho, n_cond in ((32, 0.36, 1029), (64, 0.40, 4101)):
        c1 = M.shell_coords(grid, rho, 0.0, dev)
        coords = M.batched(c1, 2)
        xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
        cases.append((f"slat {c1.shape[0]} B=2", sl, (xs, t, torch.randn(2, n_cond, CTX, device=dev))))
    print("\n## forward with attention layouts (graph-timed ms)")
    print(f"{'case':<22} {'as is':>8} {'v-contig':>8} {'bhld':>8}")
    for label, model, args in cases:
        cells = []
        for fn in (orig, vcontig, bhld):
            A.scaled_dot_product_attention = fn
            try:
                with torch.no_grad():
                    model(*args)
                    cells.append(f"{1e3 * graph_time(lambda: model(*args), reps=5):8.2f}")
            finally:
                A.scaled_dot_product_attention = orig
        print(f"{label:<22} " + " ".join(cells), flush=True)
    del ss, sl
    torch.cuda.empty_cache()


def fp8_forward_table(ceil: float) -> None:
    """bf16 vs the fp8 option on the SS flow (4,096 tokens) and an HR SLat flow (1024_cascade's 12.5k-token shell),
    guided pairs (B=2). Random weights: the released weights' outlier channels are not modelled here."""
    import json

    from trellis2.trellis2_core.models import from_config
    from trellis2.trellis2_core.nn.fp8 import quantize_blocks

    dev = torch.device("cuda")
    print("\n## fp8 DiT weights: one forward, B=2 (ms, CUDA-graph replay; err = |out - out_fp32| / |out_fp32|)")
    print(f"{'case':<24} {'bf16 ms':>8} {'fp8 ms':>8} {'x':>6} {'TF/s bf16':>9} {'TF/s fp8':>9} {'err bf16':>9} {'err fp8':>9}")
    counter = M.FlopCounter()

    def ss_args():
        return (torch.randn(2, 8, 16, 16, 16, device=dev), torch.full((2,), 800.0, device=dev),
                torch.randn(2, 1029, CTX, device=dev))  # fmt: skip

    def slat_args():
        coords = M.batched(M.shell_coords(64, 0.40, 0.0, dev), 2)
        x = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
        return x, torch.full((2,), 800.0, device=dev), torch.randn(2, 4101, CTX, device=dev)

    def feats(out):
        return (out.feats if isinstance(out, SparseTensor) else out).float()

    for role, label, make in [("sparse_structure_flow_model", "ss_flow 4096", ss_args),
                              ("shape_slat_flow_model_1024", "slat_1024 ~12.5k", slat_args)]:  # fmt: skip
        torch.manual_seed(0)
        model, args = M.build(role, dev), make()
        counter.attach(model)
        with torch.no_grad():
            f0 = counter.flops
            ref16 = feats(model(*args))
            flops = counter.flops - f0
            t16 = graph_time(lambda: model(*args), reps=10)
            name = M.ROLES[role].split("/")[-1]
            cfg = json.loads((M.MANIFESTS / f"{name}.json").read_text())["config"]
            cfg = {**cfg, "args": {**cfg["args"], "dtype": "float32"}}  # activations in float32 too, not only weights
            m32 = from_config(cfg, device="meta").to_empty(device=dev).eval()
            m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            ref32 = feats(m32(*args))
            del m32
            torch.cuda.empty_cache()
            quantize_blocks(model)
            out8 = feats(model(*args))
            t8 = graph_time(lambda: model(*args), reps=10)
        err = lambda o: ((o - ref32).norm() / ref32.norm()).item()  # noqa: E731
        print(f"{label:<24} {t16 * 1e3:8.2f} {t8 * 1e3:8.2f} {t16 / t8:5.2f}x {flops / t16 / 1e12:9.0f} "
              f"{flops / t8 / 1e12:9.0f} {err(ref16):9.2e} {err(out8):9.2e}", flush=True)  # fmt: skip
        del model, args
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", nargs="*", default=[], choices=["sdpa", "gemm", "forward", "fp8", "mlp"])
    ap.add_argument("--kernels", action="store_true", help="the heaviest kernels of an SS and an HR SLat forward")
    ap.add_argument("--layout", action="store_true", help="cuDNN attention per q/k/v layout, alone and in forwards")
    ap.add_argument("--fp8-forward", action="store_true", help="bf16 vs fp8 DiT weights: forward time and error")
    args = ap.parse_args()
    import triton

    ceil = matmul_ceiling()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}; bf16 mm ceiling {ceil:.0f} TFLOP/s", flush=True)  # fmt: skip
    if "sdpa" not in args.skip:
        sdpa_table(ceil)
    if "gemm" not in args.skip:
        gemm_table(ceil)
    if "fp8" not in args.skip:
        fp8_table()
    if "mlp" not in args.skip:
        mlp_table(ceil)
    if "forward" not in args.skip:
        forward_table(ceil)
    if args.kernels:
        kernel_table()
    if args.layout:
        layout_table()
        layout_forward_table()
    if args.fp8_forward:
        fp8_forward_table(ceil)


if __name__ == "__main__":
    main()
