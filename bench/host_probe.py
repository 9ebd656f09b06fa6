"""Host-side (CPU) costs of the DiT path on this GPU's machine: captures, first calls, launches.

    python3 bench/host_probe.py [--overlap] [--host [--fp8]] [--first-call] [--linear]
    python3 bench/host_probe.py --capture-first [MODE]     (alone, in a fresh process)

  overlap        a CUDA-graph capture behind queued replays: torch.cuda.graph (synchronises) vs a bare capture
  host           enqueueing one eager SS forward per attention backend, capture host time, the top host ops; then
                 an SLat capture's host time with a cProfile of it
  first-call     what a new token count costs on its first call: SDPA per backend, a whole SLat forward
  linear         host enqueue cost and GPU time of one F.linear / mm / GELU-epilogue GEMM per BLAS library
  capture-first  can a flow model's very first call be captured (no eager warm-up)?
Full-size models from the manifests, random weights (bench/_models.py). GPU rates are dit_probe.py's.
Run from the repo root with the package importable as ``trellis2``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402
from _timing import graph_time  # noqa: E402

from trellis2.trellis2_core.sparse import SparseTensor  # noqa: E402

C, H, D, CTX = 1536, 12, 128, 1024
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def bare_capture(graph: torch.cuda.CUDAGraph, fn, *, pool=None, mode: str = "thread_local"):
    """Capture ``fn()`` with capture_begin/end on a fresh side stream: no device sync or cache emptying first (what
    torch.cuda.graph adds). Returns fn's output (in the graph's memory)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool, capture_error_mode=mode)
        try:
            out = fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return out


def overlap_table() -> None:
    """Does a capture hide behind queued GPU work? Queue 8 replays of a B=2 SLat graph (2,984 tokens), then capture
    the B=1 key (warmed eagerly before) and replay it once: wall time of the whole sequence with torch.cuda.graph
    (synchronises and empties the cache first) vs a bare capture_begin/end on a side stream (no synchronisation)."""
    import time

    dev = torch.device("cuda")
    sl = M.build("shape_slat_flow_model_512", dev)
    c1 = M.shell_coords(32, 0.36, 0.0, dev)
    c2 = M.batched(c1, 2)
    x1, x2 = (SparseTensor(torch.randn(c.shape[0], 32, device=dev), c) for c in (c1, c2))
    t1, t2 = torch.full((1,), 800.0, device=dev), torch.full((2,), 800.0, device=dev)
    k1, k2 = torch.randn(1, 1029, CTX, device=dev), torch.randn(2, 1029, CTX, device=dev)
    print("\n## capture behind queued work (ms of wall: 8 replays of B=2 + capture B=1 + 1 replay)")
    with torch.no_grad():
        for _ in range(2):
            sl(x1, t1, k1), sl(x2, t2, k2)
        pool = torch.cuda.graph_pool_handle()
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2, pool=pool):
            sl(x2, t2, k2)
        g2.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(8):
            g2.replay()
        torch.cuda.synchronize()
        base = time.perf_counter() - t0
        print(f"  8 replays alone {1e3 * base:7.1f}")
        for how in ("torch.cuda.graph", "bare", "torch.cuda.graph", "bare"):
            g1 = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(8):
                g2.replay()
            t_q = time.perf_counter()
            if how == "bare":
                bare_capture(g1, lambda: sl(x1, t1, k1), pool=pool)
            else:
                with torch.cuda.graph(g1, pool=pool, capture_error_mode="thread_local"):
                    sl(x1, t1, k1)
            t_c = time.perf_counter()
            g1.replay()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            print(f"  {how:<17} wall {1e3 * wall:7.1f}  (queue {1e3 * (t_q - t0):5.1f}, capture host "
                  f"{1e3 * (t_c - t_q):5.1f}; exposed {1e3 * (wall - base):6.1f})", flush=True)  # fmt: skip
            del g1
    del sl
    torch.cuda.empty_cache()


def host_table() -> None:
    """Where the host's time goes in one eager forward (launch-bound at small token counts), per attention backend,
    and what one CUDA-graph capture costs the host (torch.cuda.graph's context vs a bare capture_begin/end)."""
    import time

    from trellis2.trellis2_core.nn.attention import attention_backend

    dev = torch.device("cuda")
    ss = M.build("sparse_structure_flow_model", dev)
    x, t, cond = torch.randn(1, 8, 16, 16, 16, device=dev), torch.full((1,), 800.0, device=dev), torch.randn(1, 1029, CTX, device=dev)

    def enqueue_ms(fn, reps=5):
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)  # time to enqueue (the GPU runs behind)
        torch.cuda.synchronize()
        return 1e3 * sorted(ts)[len(ts) // 2]

    print("\n## host: enqueueing one eager ss_flow forward (B=1, 4096 tokens), ms (median of 5)")
    with torch.no_grad():
        for name in ("auto", "flash", "efficient"):
            with attention_backend(name):
                for _ in range(2):
                    ss(x, t, cond)
                print(f"  attention {name:<10} {enqueue_ms(lambda: ss(x, t, cond)):8.1f}")
        from trellis2.kernels import dit_norm

        with dit_norm.use_backend("torch"):
            for _ in range(2):
                ss(x, t, cond)
            print(f"  dit_norm torch       {enqueue_ms(lambda: ss(x, t, cond)):8.1f}  (attention auto)")
        for how in ("torch.cuda.graph", "capture_begin"):
            ts = []
            for _ in range(3):
                g, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()  # a fresh pool per graph
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if how == "torch.cuda.graph":
                    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                        ss(x, t, cond)
                else:
                    bare_capture(g, lambda: ss(x, t, cond), pool=pool)
                ts.append(time.perf_counter() - t0)
                g.replay()
                torch.cuda.synchronize()
                del g
            print(f"  capture via {how:<17} host ms: " + " ".join(f"{1e3 * v:.1f}" for v in ts))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ss(x, t, cond)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def host_slat_table(fp8: bool = False) -> None:
    """Where the host's time goes when capturing an SLat forward (2,984 tokens, the guided pair B=2, as at 512):
    wall of an eager enqueue and of a capture, then cProfile of one capture by own time (Python and torch calls).
    fp8: the same with the engine's fp8 DiT weights (nn/fp8.py)."""
    import cProfile
    import pstats
    import time

    dev = torch.device("cuda")
    sl = M.build("shape_slat_flow_model_512", dev, fp8=fp8)
    c1 = M.shell_coords(32, 0.36, 0.0, dev)
    coords = M.batched(c1, 2)
    xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
    t, cond = torch.full((2,), 800.0, device=dev), torch.randn(2, 1029, CTX, device=dev)
    print(f"\n## host: SLat forward {c1.shape[0]} tokens B=2, {'fp8' if fp8 else 'bf16'} weights (eager enqueue, "
          "capture), ms")
    with torch.no_grad():
        for _ in range(3):
            sl(xs, t, cond, zero_cond_from=1)
        torch.cuda.synchronize()
        for how in ("eager", "capture", "eager", "capture"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if how == "eager":
                sl(xs, t, cond, zero_cond_from=1)
            else:
                g = torch.cuda.CUDAGraph()
                bare_capture(g, lambda: sl(xs, t, cond, zero_cond_from=1), pool=torch.cuda.graph_pool_handle())
            print(f"  {how:<8} {1e3 * (time.perf_counter() - t0):7.1f}", flush=True)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        g = torch.cuda.CUDAGraph()
        prof.enable()
        bare_capture(g, lambda: sl(xs, t, cond, zero_cond_from=1), pool=torch.cuda.graph_pool_handle())
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    del sl, g
    torch.cuda.empty_cache()


def first_call_table() -> None:
    """What a new token count costs on its first call (every new image brings one): host ms of the first and a
    repeated SDPA call per backend at fresh sequence lengths (self and cross, B=1 and 2), then of a whole SLat
    forward (2,984-ish tokens, B=2) per attention backend, first call vs second."""
    import time

    from trellis2.trellis2_core.nn.attention import attention_backend

    def wall(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0)

    bf = dict(device="cuda", dtype=torch.bfloat16)
    warm = torch.randn(1, H, 500, D, **bf)
    for be in SDPA.values():  # library loading and initialisation are not what is measured
        with sdpa_kernel([be]):
            F.scaled_dot_product_attention(warm, warm, warm)
    print("\n## first call at a new sequence length: ms (first / second call, synchronised)")
    print(f"{'case':<24} " + " ".join(f"{n:>16}" for n in SDPA))
    for i, (b, lk) in enumerate([(2, None), (1, None), (2, 1029), (1, 1029)]):
        n = 3001 + 37 * i
        q = torch.randn(b, H, n, D, **bf)
        k, v = (torch.randn(b, H, lk or n, D, **bf) for _ in range(2))
        cells = []
        for j, be in enumerate(SDPA.values()):
            qq, kk, vv = q[:, :, : n - j], k[:, :, : (lk or n - j)], v[:, :, : (lk or n - j)]  # new lengths per backend
            with sdpa_kernel([be]):
                try:
                    f = lambda: F.scaled_dot_product_attention(qq, kk, vv)  # noqa: E731
                    cells.append(f"{wall(f):7.1f} /{wall(f):6.1f}")
                except RuntimeError:
                    cells.append(f"{'n/a':>16}")
        print(f"{f'B={b} {n}x' + (str(lk) if lk else 'self'):<24} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    dev = torch.device("cuda")
    sl = M.build("shape_slat_flow_model_512", dev)
    t, cond = torch.full((2,), 800.0, device=dev), torch.randn(2, 1029, CTX, device=dev)
    print("\n## SLat forward B=2 at a new token count, per attention backend: ms (first / second call)")
    with torch.no_grad():
        for i, name in enumerate(("auto", "flash", "efficient", "auto")):
            c1 = M.shell_coords(32, 0.36 * (1.03 + 0.03 * i), 0.0, dev)
            coords = M.batched(c1, 2)
            xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
            with attention_backend(name):
                first, second = wall(lambda: sl(xs, t, cond, zero_cond_from=1)), wall(lambda: sl(xs, t, cond, zero_cond_from=1))
            print(f"  {name:<10} {c1.shape[0]:6d} tokens  {first:7.1f} / {second:6.1f}", flush=True)
    del sl
    torch.cuda.empty_cache()


def capture_first(mode: str = "thread_local") -> None:
    """Can a flow model's very first call be captured (no eager warm-up: Triton compilation, cuDNN plans and the
    coordinate caches created inside the capture)? Run as the first thing in a fresh process."""
    dev = torch.device("cuda")
    print(f"\n## capture-first (fresh process, capture_error_mode={mode}): first-ever call captured, replay vs eager")
    ss = M.build("sparse_structure_flow_model", dev)
    x, t, cond = torch.randn(1, 8, 16, 16, 16, device=dev), torch.full((1,), 800.0, device=dev), torch.randn(1, 1029, CTX, device=dev)
    sl = M.build("shape_slat_flow_model_512", dev)
    coords = M.shell_coords(32, 0.36, 0.0, dev)
    xs = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
    for label, model, args in (("ss_flow", ss, (x, t, cond)), ("slat", sl, (xs, t, cond))):
        g = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad():
                out = bare_capture(g, lambda: model(*args), mode=mode)
            g.replay()
            with torch.no_grad():
                ref = model(*args)
            a, b = (o.feats if isinstance(o, SparseTensor) else o for o in (out, ref))
            print(f"  {label}: captured; replay == eager: {torch.equal(a, b)} (max diff {(a - b).abs().max().item():.2e})")
        except Exception as e:
            print(f"  {label}: capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            break


def linear_host_table() -> None:
    """Host cost of enqueueing one F.linear (bias, bf16, 2,984 x 1536 -> 4608) under torch's default BLAS choice
    (cuBLASLt with a bias epilogue: a heuristic query per call) vs preferred_blas_library("cublas"), and the GPU time
    of each (graph-timed)."""
    import time

    print("\n## F.linear host enqueue (us per call, median of 5 x 200 calls) and GPU time (us)")
    x = torch.randn(2984, C, device="cuda", dtype=torch.bfloat16)
    w, bias = torch.randn(3 * C, C, device="cuda", dtype=torch.bfloat16), torch.randn(3 * C, device="cuda", dtype=torch.bfloat16)
    before = torch.backends.cuda.preferred_blas_library()
    for lib in ("cublaslt", "cublas"):
        torch.backends.cuda.preferred_blas_library(lib)
        for label, fn in (("linear+bias", lambda: F.linear(x, w, bias)), ("mm", lambda: torch.mm(x, w.t())),
                          ("gelu epilogue", lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True))):  # fmt: skip
            for _ in range(20):
                fn()
            ts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                ts.append((time.perf_counter() - t0) / 200)
                torch.cuda.synchronize()
            gpu = graph_time(fn, reps=10)
            print(f"  {lib:<9} {label:<14} host {1e6 * sorted(ts)[2]:6.1f}   gpu {1e6 * gpu:7.1f}", flush=True)
    torch.backends.cuda.preferred_blas_library(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--overlap", action="store_true", help="a capture behind queued GPU work: synchronised vs bare")
    ap.add_argument("--host", action="store_true", help="host costs of an eager SS forward and of an SLat capture")
    ap.add_argument("--first-call", action="store_true", help="first-call costs of new token counts per backend")
    ap.add_argument("--linear", action="store_true", help="F.linear host enqueue cost per BLAS library")
    ap.add_argument("--fp8", action="store_true", help="with --host: the SLat capture with fp8 DiT weights too")
    ap.add_argument("--capture-first", nargs="?", const="thread_local", default=None, metavar="MODE",
                    help="only: capture a first-ever forward (fresh process); MODE: capture_error_mode")  # fmt: skip
    args = ap.parse_args()
    if args.capture_first:
        capture_first(args.capture_first)
        return
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)  # fmt: skip
    if args.overlap:
        overlap_table()
    if args.host:
        host_table()
        host_slat_table()
        if args.fp8:
            host_slat_table(fp8=True)
    if args.first_call:
        first_call_table()
    if args.linear:
        linear_host_table()


if __name__ == "__main__":
    main()
