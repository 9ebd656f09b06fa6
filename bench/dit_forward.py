"""Forward time of the two flow DiTs at official size (random weights), bf16 vs fp32 agreement, host syncs.

Run on a CUDA machine from the repo's parent folder layout (the repo root is the package ``trellis2``):
    python3 bench/dit_forward.py [--tokens 4096 20000 49152]
Prints one line per case: tokens, batch, path (dense / varlen), ms per forward (median of N after warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.sparse import SparseTensor

MANIFESTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "manifests"


def build(name: str, device, dtype=None, seed=0):
    cfg = json.loads((MANIFESTS / f"{name}.json").read_text())["config"]
    torch.manual_seed(seed)
    m = from_config(cfg, device=device, dtype=dtype).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.endswith("gamma") or "norm2.weight" in k:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.normal_(0, 0.02) if "modulation" not in k else p.normal_(0, 1 / p.shape[0] ** 0.5 * 2.45)
            else:
                p.normal_(0, (1.0 / p.shape[1]) ** 0.5)
    return m


def timed(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def sparse_input(lengths, res, channels, same_coords=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords, cells = [], None
    for b, n in enumerate(lengths):
        if cells is None or not same_coords:
            cells = torch.randperm(res**3, generator=g)[:n].sort().values
        xyz = torch.stack([cells // (res * res), cells // res % res, cells % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int().cuda()
    return SparseTensor(torch.randn(coords.shape[0], channels, device="cuda"), coords)


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 20000, 49152])
    ap.add_argument("--profile", type=int, default=0, help="only profile one SLat forward at this many tokens")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.profile:
        return profile(args.profile)

    # ---- stage 1: dense SS flow, guidance pair batched (B = 2), cond = 1029 DINOv3 tokens
    ss = build("ss_flow_img_dit_1_3B_64_bf16", dev)
    x, t = torch.randn(2, 8, 16, 16, 16, device=dev), torch.tensor([800.0, 800.0], device=dev)
    cond = torch.randn(2, 1029, 1024, device=dev)
    with torch.no_grad():
        out = ss(x, t, cond)
        torch.cuda.set_sync_debug_mode("error")
        ss(x, t, cond)  # raises if anything in the forward synchronises with the host
        torch.cuda.set_sync_debug_mode(0)
        ms = timed(lambda: ss(x, t, cond))
        print(f"ss_flow  tokens 4096 batch 2 dense  {ms:8.1f} ms  peak {peak_gib():.1f} GiB", flush=True)
        sd = ss.state_dict()
        del ss
        ss32 = build("ss_flow_img_dit_1_3B_64_bf16", dev, dtype=torch.float32)
        ss32.load_state_dict(sd)
        print(f"ss_flow  bf16 vs fp32 rel err {rel(out, ss32(x, t, cond)):.3e}", flush=True)
        del ss32, sd
    torch.cuda.empty_cache()

    # ---- stages 2/3: sparse SLat flow
    sl = build("slat_flow_img2shape_dit_1_3B_1024_bf16", dev)
    cond1 = torch.randn(1, 4101, 1024, device=dev)
    with torch.no_grad():
        for n in args.tokens:
            torch.cuda.reset_peak_memory_stats()
            x1 = sparse_input([n], 96, 32)
            sl(x1, t[:1], cond1)
            torch.cuda.set_sync_debug_mode("error")
            sl(x1.replace(x1.feats), t[:1], cond1)  # cached offsets/phases: no host sync
            torch.cuda.set_sync_debug_mode(0)
            ms = timed(lambda: sl(x1.replace(x1.feats), t[:1], cond1), reps=3)
            print(f"slat     tokens {n:5d} batch 1 dense  {ms:8.1f} ms  peak {peak_gib():.1f} GiB", flush=True)
        n = args.tokens[1] if len(args.tokens) > 1 else args.tokens[0]
        x2 = sparse_input([n, n], 96, 32, same_coords=True)
        cond2 = torch.randn(2, 4101, 1024, device=dev)
        ms = timed(lambda: sl(x2.replace(x2.feats), t, cond2), reps=3)
        print(f"slat     tokens {n:5d} batch 2 dense  {ms:8.1f} ms (CFG pair batched)", flush=True)
        xv = sparse_input([n, n // 2], 96, 32)
        ms = timed(lambda: sl(xv.replace(xv.feats), t, cond2), reps=3)
        print(f"slat     tokens {n:5d}+{n // 2} varlen  {ms:8.1f} ms", flush=True)


def profile(n):
    """Top CUDA kernels of one SLat forward (where the time goes)."""
    sl = build("slat_flow_img2shape_dit_1_3B_1024_bf16", torch.device("cuda"))
    x, t, cond = sparse_input([n], 96, 32), torch.tensor([800.0], device="cuda"), torch.randn(1, 4101, 1024, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            sl(x.replace(x.feats), t, cond)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            sl(x.replace(x.feats), t, cond)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
