"""Where the SC-VAE decoders' time goes on CUDA: per level and kind of work, per convolution, and the top kernels.

    python3 bench/decoder_probe.py                      # 1024_cascade's decoders (12.5k latent voxels -> ~3.6 M)
    python3 bench/decoder_probe.py --type 512 --top 25
    python3 bench/decoder_probe.py --memory             # peak memory per decode vs the memory planner's estimate

Full-size random decoders from the manifests; the shape decoder subdivides onto the bench's sphere shell (as in
bench_pipeline.py), the texture decoder follows its subdivisions. Times are CUDA-event times of one decode after a
warm-up (which autotunes the kernels); per-module times come from events recorded by forward hooks (they add a
few microseconds per module). ``tap%`` is the share of (128-row tile, neighbour offset) pairs that some row of the
tile needs in the decoder's own row order (what the plain kernel runs; the planned kernel's share is in the
``--convs`` table), ``nbr%`` the share of neighbours present (the useful work). TF/s counts all 27 offsets.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402
from _timing import cuda_time, kernel_totals  # noqa: E402

from trellis2.trellis2_core.sparse import SparseTensor  # noqa: E402
from trellis2.trellis2_core.sparse.conv import SparseConv3d, neighbour_map  # noqa: E402

LATENT_GRID = {"512": 32, "1024_cascade": 64, "1536_cascade": 96}


class Events:
    """CUDA events around every SparseConv3d / Linear / decoder block call, tagged with the level it runs at."""

    def __init__(self, decoder: nn.Module):
        self.rows: list = []  # (level, kind, start, end, info)
        self.handles = []
        for level, blocks in enumerate(decoder.blocks):
            for block in blocks:
                self._hook(block, level, "block")
                for m in block.modules():
                    if isinstance(m, SparseConv3d):
                        self._hook(m, level, "conv")
                    elif isinstance(m, nn.Linear):
                        self._hook(m, level, "linear")

    def _hook(self, module, level, kind):
        def pre(m, args):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            m._probe_start = ev

        def post(m, args, out):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            info = None
            if kind == "conv":
                x = args[0]
                info = (x.feats.shape[0], m.in_channels, m.out_channels, neighbour_map(x))
            self.rows.append((level, kind, m._probe_start, ev, info))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def tile_taps(nbr: torch.Tensor, bm: int = 128) -> float:
    present = nbr >= 0
    pad = (-present.shape[0]) % bm
    present = torch.cat([present, present.new_zeros(pad, 27)])
    return present.reshape(-1, bm, 27).any(1).float().mean().item()


def report(label: str, run, decoder: nn.Module, top: int) -> None:
    t = cuda_time(run, reps=3, warm=1)
    ev = Events(decoder)
    run()
    torch.cuda.synchronize()
    ev.remove()
    per = defaultdict(float)
    print(f"\n## {label}: {t * 1e3:.1f} ms per decode (CUDA events)")
    print(f"{'level':>5} {'voxels':>9} {'Ci':>5} {'Co':>5} {'conv_ms':>8} {'TF/s':>6} {'nbr%':>5} {'tap%':>5}")
    for level, kind, a, b, info in ev.rows:  # statistics only now: syncs inside the hooks would distort the times
        ms = a.elapsed_time(b)
        per[(level, kind)] += ms
        if kind == "conv":
            n, ci, co, nbr = info
            present = (nbr >= 0).float().mean().item()
            print(f"{level:5d} {n:9d} {ci:5d} {co:5d} {ms:8.3f} {2 * n * 27 * ci * co / ms / 1e9:6.0f} "
                  f"{100 * present:5.1f} {100 * tile_taps(nbr):5.1f}")  # fmt: skip
    print(f"{'level':>5} {'blocks_ms':>10} {'conv_ms':>8} {'linear_ms':>10} {'rest_ms':>8}")
    for level in sorted({lv for lv, _ in per}):
        b, c, li = per[(level, "block")], per[(level, "conv")], per[(level, "linear")]
        print(f"{level:5d} {b:10.2f} {c:8.2f} {li:10.2f} {b - c - li:8.2f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    busy, rows = kernel_totals(prof)
    print(f"kernels: busy {busy:.1f} ms of {t * 1e3:.1f} (top {top})")
    for name, n, ms in rows[:top]:
        print(f"  {ms:8.3f} ms {100 * ms / busy:5.1f}% x{n:<5d} {name[:100]}")


CONV_CASES = [  # (grid, Ci, Co) of the 1024 shape decoder: each level's C->C conv, and the up blocks' C->8C' conv1
    (64, 1024, 1024), (64, 1024, 4096), (128, 512, 512), (128, 512, 2048), (256, 256, 256), (512, 128, 128),
    (512, 128, 512), (1024, 64, 64),
]  # fmt: skip
PLANS = [(128, 4096), (128, 0), (64, 4096)]  # (rows per tile, mask-sort window)


def conv_table() -> None:
    """The conv kernel as the decoders call it (every tile runs every offset some row needs, in the decoder's row
    order) against the planned kernel (rows sorted by neighbour mask within windows; tiles skip what none needs)."""
    from trellis2.kernels.sparse_conv import build_neighbours
    from trellis2.kernels.sparse_conv import triton as tri
    from trellis2.kernels.sparse_conv.plan import build_tile_plan

    heads = " ".join(f"{f'bm{bm}/w{w}':>14}" for bm, w in PLANS)
    print("\n## sparse conv fp16 on the shell rho=0.4: ms (nominal TFLOP/s, all 27 taps); planned: ms (work%)")
    print(f"{'grid':>5} {'Ci':>5} {'Co':>5} {'voxels':>8} {'nbr%':>5} {'current':>14} {heads} {'plan_ms':>8} {'err':>8}")
    for grid, ci, co in CONV_CASES:
        coords = M.shell_coords(grid, 0.4, 0.0, "cuda")
        n = coords.shape[0]
        nbr = build_neighbours(coords)
        feats = torch.randn(n, ci, device="cuda", dtype=torch.float16)
        w = (torch.randn(co, 3, 3, 3, ci, device="cuda") / (27 * ci) ** 0.5).half()
        bias = torch.randn(co, device="cuda", dtype=torch.float16)
        nominal = 2 * n * 27 * ci * co / 1e12
        ref = tri.submanifold_conv3d(feats, nbr, w, bias)
        t0 = cuda_time(lambda: tri.submanifold_conv3d(feats, nbr, w, bias), reps=5)
        cells, err = [], 0.0
        for bm, win in PLANS:
            plan = build_tile_plan(nbr, block_m=bm, window=win)
            got = tri.submanifold_conv3d(feats, nbr, w, bias, plan)
            err = max(err, ((got.float() - ref.float()).norm() / ref.float().norm()).item())
            t = cuda_time(lambda: tri.submanifold_conv3d(feats, nbr, w, bias, plan), reps=5)
            cells.append(f"{t * 1e3:7.2f} ({100 * plan.work_fraction:3.0f}%)")
        t_plan = cuda_time(lambda: build_tile_plan(nbr, block_m=128, window=4096), reps=3)
        present = 100 * (nbr >= 0).float().mean().item()
        print(f"{grid:5d} {ci:5d} {co:5d} {n:8d} {present:5.1f} {t0 * 1e3:7.2f} ({nominal / t0:4.0f}) "
              + " ".join(f"{c:>14}" for c in cells) + f" {t_plan * 1e3:8.2f} {err:8.1e}")  # fmt: skip
        del feats, nbr, ref
        torch.cuda.empty_cache()


def memory_table() -> None:
    """Peak memory of a decode above what was allocated before it (activations and output; weights and the
    latent excluded) against the memory planner's estimate for the same latent and chunk rows."""
    from trellis2.kernels import vae_norm
    from trellis2.trellis2_core.models.decoder_chunking import chunk_decoder
    from trellis2.trellis2_core.pipeline import memory as mem

    dev, gib = torch.device("cuda"), 2**30
    sizes = M.official_sizes(False)
    decoders = {role: M.build(role, dev) for role in ("shape_slat_decoder", "tex_slat_decoder")}
    fused = vae_norm.fused_available()  # as the planner decides for a CUDA device
    print("\n## decoder peak memory above the start of the decode, GiB (measured | the memory planner's estimate)")
    print(f"{'latent':>7} {'voxels':>9} {'decoder':<8} {'chunk':>8} {'measured':>9} {'estimate':>9}")
    for grid, rho in ((64, 0.40), (64, 0.56), (96, 0.45)):
        M.SHELL_NOW.update(rho=rho, w=0.0)
        coords = M.shell_coords(grid, rho, 0.0, dev)
        lat = SparseTensor(torch.randn(coords.shape[0], 32, device=dev), coords)
        subs = None
        for role, dec in decoders.items():
            for chunk in (None, 1 << 20, 1 << 18):
                chunk_decoder(dec, chunk)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    if role == "shape_slat_decoder":
                        out, subs = dec(lat, return_subs=True)
                    else:
                        out = dec(lat, guide_subs=subs)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                voxels = out.feats.shape[0]
                del out
                est = mem.decoder_activation_bytes(coords.shape[0], sizes[role], chunk, fused_norms=fused)
                print(f"{coords.shape[0]:7d} {voxels:9d} {role.split('_')[0]:<8} {str(chunk):>8} {peak / gib:9.2f} "
                      f"{est / gib:9.2f}", flush=True)  # fmt: skip
            chunk_decoder(dec, None)
        del lat, subs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="1024_cascade", choices=sorted(LATENT_GRID))
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--convs", action="store_true", help="first: the conv kernel per decoder level, current vs planned")
    ap.add_argument("--memory", action="store_true", help="only: decode peak memory vs the memory planner's estimate")
    args = ap.parse_args()
    if args.memory:
        memory_table()
        return
    if args.convs:
        conv_table()
    dev = torch.device("cuda")
    rho, w = M.SHELLS[args.type]
    M.SHELL_NOW.update(rho=rho, w=w)
    coords = M.shell_coords(LATENT_GRID[args.type], rho, w, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    shape_lat = SparseTensor(torch.randn(coords.shape[0], 32, device=dev, generator=gen), coords)
    tex_lat = SparseTensor(torch.randn(coords.shape[0], 32, device=dev, generator=gen), coords)
    shape_dec = M.build("shape_slat_decoder", dev)
    tex_dec = M.build("tex_slat_decoder", dev)
    with torch.no_grad():
        out, subs = shape_dec(shape_lat, return_subs=True)
        print(f"# {torch.cuda.get_device_name()}: {args.type}, {coords.shape[0]} latent voxels -> {out.feats.shape[0]}")
        report("shape decoder", lambda: shape_dec(shape_lat, return_subs=True), shape_dec, args.top)
        report("texture decoder", lambda: tex_dec(tex_lat, guide_subs=subs), tex_dec, args.top)


if __name__ == "__main__":
    main()
