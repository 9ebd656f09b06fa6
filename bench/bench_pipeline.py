"""End-to-end sampling + decode benchmark of every pipeline type at official size (random weights), on CUDA.

    python3 bench/bench_pipeline.py                                   # all types, unconstrained, + sparse-conv table
    python3 bench/bench_pipeline.py --vram-budget 12 --types 1024_cascade --no-kernels --pinned  # issue 9: 12 GiB
    python3 bench/bench_pipeline.py --vram-budget 8 --types 512 --no-kernels --pinned            # issue 9: 8 GiB

Models are built from tests/data/manifests (meta -> cuda, random normals); structures are fixed sphere shells
(bench/_models.py SHELLS: ~3k tokens at 512, ~12.5k HR tokens at 1024_cascade, ~49k at 1536_cascade) and the
random shape decoder is made to subdivide onto the same shell, so voxel counts are realistic and repeatable.
Sampling uses pipeline.json's samplers (12 steps, official guidance); conditioning is random [1,1029,1024] and
[1,4101,1024]. Per stage: time, matrix FLOPs (hooks; sparse convs counted at all 27 taps), TFLOP/s and % of a bf16
torch.mm ceiling measured in the same run, peak memory. ``--vram-budget GIB`` caps the caching allocator with
torch.cuda.set_per_process_memory_fraction and uses the 'offload' component policy (weights in CPU RAM between
stages; ``--pinned`` keeps one pinned CPU copy and uploads from it, see _models.TimedComponents). The warm-up run
(1024_cascade when a cascade is asked for, else 512) compiles/autotunes the kernels and loads every model first.
``--log FILE`` appends the rows as JSON lines. Run from the repo root with the package importable as ``trellis2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402
from _timing import PowerLog, cuda_time, matmul_ceiling  # noqa: E402

from trellis2.kernels import sparse_conv as spconv  # noqa: E402
from trellis2.trellis2_core.pipeline import guidance  # noqa: E402
from trellis2.trellis2_core.pipeline.decode import decode_material, decode_shape  # noqa: E402
from trellis2.trellis2_core.pipeline.material import sample_material  # noqa: E402
from trellis2.trellis2_core.pipeline.shape import sample_shape  # noqa: E402
from trellis2.trellis2_core.pipeline.structure import sample_structure  # noqa: E402
from trellis2.trellis2_core.pipeline.allocator import prefer_expandable_segments  # noqa: E402
from trellis2.trellis2_core.pipeline.memory import plan_memory  # noqa: E402
from trellis2.trellis2_core.pipeline.types import Conditioning, Structure, plan  # noqa: E402
from trellis2.trellis2_core.sampling import SamplerParams  # noqa: E402

GIB = 2**30
SHORT = {
    "sparse_structure_flow_model": "ss_flow", "sparse_structure_decoder": "ss_dec",
    "shape_slat_flow_model_512": "shape_flow_512", "shape_slat_flow_model_1024": "shape_flow_1024",
    "tex_slat_flow_model_512": "tex_flow_512", "tex_slat_flow_model_1024": "tex_flow_1024",
    "shape_slat_decoder": "shape_dec", "tex_slat_decoder": "tex_dec",
}  # fmt: skip
LOG: list[dict] = []
POWER: PowerLog | None = None  # --power: clocks and board power per stage / run


def emit(line: str, **row) -> None:
    print(line, flush=True)
    if row:
        LOG.append(row)


# ------------------------------------------------------------------------------------------------ sparse conv
CONV_CASES = [  # (grid, Ci, Co): the shape decoder's levels at 1024^3 (ConvNeXt convs C->C, one up-conv C->8C/2)
    (64, 1024, 1024), (128, 512, 512), (256, 256, 256), (512, 128, 128), (512, 128, 512), (1024, 64, 64),
]  # fmt: skip


def conv_table(ceiling: float, dtype=torch.float16) -> None:
    emit(f"\n## sparse conv 3x3x3, {str(dtype)[6:]}, sphere shell rho=0.4 (ms; nominal TFLOP/s counts all 27 taps)")
    emit(f"{'grid':>5} {'Ci':>5} {'Co':>5} {'voxels':>9} {'nbr%':>5} {'nbr_ms':>7} {'triton':>8} {'torch':>8} "
         f"{'dense':>8} {'tri_TF':>7} {'tri_eff':>7} {'ref_TF':>7} {'dense_TF':>8} {'err_tri':>8} {'err_ref':>8}")  # fmt: skip
    for grid, ci, co in CONV_CASES:
        try:
            coords = M.shell_coords(grid, 0.4, 0.0, "cuda")
            n = coords.shape[0]
            t_nbr = cuda_time(lambda: spconv.build_neighbours(coords), reps=3, warm=1)
            nbr = spconv.build_neighbours(coords)
            present = (nbr >= 0).sum().item() / n
            feats = torch.randn(n, ci, device="cuda", dtype=dtype)
            w = (torch.randn(co, 3, 3, 3, ci, device="cuda") / (27 * ci) ** 0.5).to(dtype)
            bias = torch.randn(co, device="cuda", dtype=dtype)
            out = spconv.submanifold_conv3d(feats, nbr, w, bias, backend="triton")
            ref = spconv.submanifold_conv3d(feats, nbr, w, bias, backend="torch")
            exact = spconv.submanifold_conv3d(feats.float(), nbr, w.float(), bias.float(), backend="torch")
            err, err_ref = (((o.float() - exact).norm() / exact.norm()).item() for o in (out, ref))
            del out, ref, exact
            t_tri = cuda_time(lambda: spconv.submanifold_conv3d(feats, nbr, w, bias, backend="triton"))
            t_ref = cuda_time(lambda: spconv.submanifold_conv3d(feats, nbr, w, bias, backend="torch"), reps=5)
            t_dense, dense_tf = float("nan"), float("nan")
            if grid**3 * (ci + co) * 2 <= 24 * GIB:
                dense = torch.zeros(1, ci, grid, grid, grid, device="cuda", dtype=dtype)
                dense = dense.to(memory_format=torch.channels_last_3d)
                c = coords.long()
                dense[0, :, c[:, 1], c[:, 2], c[:, 3]] = feats.t()
                wd = w.permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)
                t_dense = cuda_time(lambda: F.conv3d(dense, wd, bias, padding=1), reps=3, warm=1)
                dense_tf = 2 * grid**3 * 27 * ci * co / t_dense / 1e12
                del dense
            flops = 2 * n * 27 * ci * co
            emit(
                f"{grid:5d} {ci:5d} {co:5d} {n:9d} {100 * present / 27:5.1f} {t_nbr * 1e3:7.2f} {t_tri * 1e3:8.2f} "
                f"{t_ref * 1e3:8.2f} {t_dense * 1e3:8.2f} {flops / t_tri / 1e12:7.1f} {flops * present / 27 / t_tri / 1e12:7.1f} "
                f"{flops / t_ref / 1e12:7.1f} {dense_tf:8.1f} {err:8.1e} {err_ref:8.1e}",
                kind="conv", grid=grid, ci=ci, co=co, voxels=n, nbr_frac=present / 27, t_nbr=t_nbr, t_triton=t_tri,
                t_torch=t_ref, t_dense=t_dense, rel_err=err, rel_err_ref=err_ref, ceiling=ceiling,
            )  # fmt: skip
            feats = nbr = None  # free before the next case allocates
        except torch.OutOfMemoryError as e:
            emit(f"{grid:5d} {ci:5d} {co:5d} OOM: {str(e)[:120]}")
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ pipelines
def sampler(stage: str) -> SamplerParams:
    return SamplerParams.from_pipeline_entry(M.PIPELINE[f"{stage}_sampler"])


def run_pipeline(ptype: str, comps: M.TimedComponents, cond: Conditioning, shell_scale: float = 1.0) -> dict:
    """Sampling + decode of one pipeline type on its fixed shell (radius x ``shell_scale``); returns counts and wall
    time."""
    p = plan(ptype)
    rho, w = M.SHELLS[ptype]
    rho *= shell_scale
    M.SHELL_NOW.update(rho=rho, w=w)
    comps.records.clear()
    g = torch.Generator().manual_seed(0)
    torch.cuda.synchronize()
    t0, at0 = time.perf_counter(), time.time()
    sample_structure(comps, cond, resolution=p.structure_resolution, params=sampler("sparse_structure"), generator=g)
    structure = Structure(coords=M.shell_coords(32, rho, w, comps.device), resolution=32)  # fixed, not the random one
    shape = sample_shape(
        comps, cond, structure, pipeline_type=ptype, params=sampler("shape_slat"),
        normalization=M.normalization("shape_slat_normalization"), generator=g,
    )  # fmt: skip
    material = sample_material(
        comps, cond, shape, params=sampler("tex_slat"), shape_normalization=M.normalization("shape_slat_normalization"),
        tex_normalization=M.normalization("tex_slat_normalization"), generator=g,
    )  # fmt: skip
    geometry = decode_shape(comps, shape)
    ovoxel = decode_material(comps, material, geometry)
    torch.cuda.synchronize()
    return dict(wall=time.perf_counter() - t0, at=(at0, time.time()), lr_tokens=structure.num_voxels, hr_tokens=len(shape.latent),
                resolution=shape.resolution, voxels=ovoxel.num_voxels)  # fmt: skip


def report(ptype: str, info: dict, comps: M.TimedComponents, ceiling: float, budget: float | None) -> None:
    pol = comps.policy + (" pinned" if comps.pinned else "")
    tag = f"budget {budget:g} GiB, policy {pol}" if budget else f"unconstrained, policy {pol}"
    emit(f"\n## {ptype} ({tag}): {info['lr_tokens']} LR tokens, {info['hr_tokens']} final-latent tokens, "
         f"R={info['resolution']}, {info['voxels']} decoded voxels")  # fmt: skip
    watch = f" {'MHz':>6} {'W':>5} {'cap%':>5}" if POWER else ""
    emit(f"{'stage':<20} {'load_s':>7} {'run_s':>8} {'TFLOP':>8} {'TFLOP/s':>8} {'%ceil':>6} {'peak_GiB':>8}{watch}")
    seen: dict[str, int] = {}
    for r in comps.records:
        name = SHORT.get(r["role"], r["role"])
        seen[name] = seen.get(name, 0) + 1
        if name == "shape_dec" and plan(ptype).cascade and seen[name] == 1:
            name = "shape_dec.upsample"
        tf = r["flops"] / 1e12
        rate = tf / r["run"] if r["run"] > 0 else 0.0
        power = POWER.window(*r["at"]) if POWER else None
        emit(f"{name:<20} {r['load'] + r['release']:7.2f} {r['run']:8.3f} {tf:8.1f} {rate:8.1f} {100 * rate / ceiling:6.1f} "
             f"{r['peak'] / GIB:8.2f}" + (" " + POWER.format(power) if POWER else ""),
             kind="stage", ptype=ptype, stage=name, budget=budget, power=power, **r)  # fmt: skip
    flops = sum(r["flops"] for r in comps.records) / 1e12
    power = POWER.window(*info["at"]) if POWER and "at" in info else None
    emit(f"{'TOTAL (wall)':<20} {'':7} {info['wall']:8.3f} {flops:8.1f} {flops / info['wall']:8.1f} "
         f"{100 * flops / info['wall'] / ceiling:6.1f} {torch.cuda.max_memory_reserved() / GIB:8.2f}"
         + (" " + POWER.format(power) if POWER else "") + " (reserved GiB)",
         kind="total", ptype=ptype, budget=budget, ceiling=ceiling, power=power, **info)  # fmt: skip


def print_trace(ptype: str, wall: float, trace: list) -> None:
    """One line per stage: the sampler's model calls as kind/host-ms (gap before the call, ms, when > 5)."""
    emit(f"\n# trace {ptype} (wall {wall:.3f} s): kind rows host_ms [+gap_ms]")
    stages: dict[str, list] = {}
    for stage, kind, rows, host, gap in trace:
        stages.setdefault(stage, []).append(f"{kind[0]}{rows}:{host:.0f}" + (f"[+{gap:.0f}]" if gap > 5 else ""))
    for stage, calls in stages.items():
        emit(f"{stage:<18} " + " ".join(calls))


def print_gaps(ptype: str, wall: float, prof, top: int = 12) -> None:
    """GPU busy time of a profiled run (union of kernel intervals) and its longest idle gaps, each with the stage
    and sampler call the host was in when the GPU ran dry (the bench's ``stage``/``call`` profiler ranges) and the
    kernels either side: where host work (first calls, captures, read-backs) leaves the GPU waiting."""
    spans, ranges = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name.startswith(("stage ", "call ")):
            ranges.append((e.time_range.start, e.time_range.end, e.name))
    if not spans:
        return
    spans.sort()
    merged, gaps = [list(spans[0])], []
    for a, b, name in spans[1:]:
        if a > merged[-1][1]:
            gaps.append((a - merged[-1][1], merged[-1][1], merged[-1][2], name))
            merged.append([a, b, name])
        elif b > merged[-1][1]:
            merged[-1][1], merged[-1][2] = b, name
    busy = sum(b - a for a, b, _ in merged) / 1e6
    t0 = spans[0][0]
    emit(f"\n# GPU of {ptype} (profiled run, wall {wall:.3f} s): busy {busy:.3f} s, idle between kernels "
         f"{sum(g[0] for g in gaps) / 1e6:.3f} s in {len(gaps)} gaps ({sum(g[0] for g in gaps if g[0] > 1e3) / 1e6:.3f} s "
         f"in gaps > 1 ms); longest:")  # fmt: skip
    for us, at, before, after in sorted(gaps, reverse=True)[:top]:
        where = " > ".join(n for a, b, n in sorted(ranges) if a <= at <= b) or "-"
        emit(f"  {us / 1e3:7.1f} ms at {(at - t0) / 1e3:8.1f} ms  in {where}\n"
             f"             after {before[:60]}  before {after[:60]}")  # fmt: skip


def print_live_blocks(snapshot: dict, top: int = 12) -> None:
    """The allocator's live blocks at an OOM, summed per allocating site (innermost frames of this package)."""
    sites: dict[str, list] = {}
    reserved = sum(seg["total_size"] for seg in snapshot["segments"])
    for seg in snapshot["segments"]:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                frames = [f for f in block.get("frames", []) if "trellis2" in f["filename"]][:3]
                site = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames) or "?"
                row = sites.setdefault(site, [0, 0])
                row[0] += block["size"]
                row[1] += 1
    live = sum(size for size, _ in sites.values())
    emit(f"  live {live / GIB:.2f} GiB of {reserved / GIB:.2f} GiB reserved; largest sites:")
    for site, (size, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]:
        emit(f"  {size / GIB:7.3f} GiB x{n:<4d} {site[:160]}")


def print_syncs(ptype: str, comps: M.TimedComponents, cond: Conditioning, top: int = 15) -> None:
    """One plain run with torch's sync debug mode on: every host<->device synchronisation the pipeline makes (item,
    nonzero, D2H copies, ...), counted per calling line of this package (innermost three frames)."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "trellis2" in f.filename and "bench" not in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:])) or f"{filename}:{lineno}"
        sites[where] = sites.get(where, 0) + 1

    with comps.plain(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            wall = run_pipeline(ptype, comps, cond)["wall"]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    emit(f"\n# syncs of {ptype} (plain run under sync debug mode, wall {wall:.3f} s): {sum(sites.values())} at "
         f"{len(sites)} sites; most frequent:")  # fmt: skip
    for where, n in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
        emit(f"  {n:5d}  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="*", default=["512", "1024_cascade", "1536_cascade"])
    ap.add_argument("--vram-budget", type=float, default=None, metavar="GIB", help="cap GPU memory (issue 9)")
    ap.add_argument("--policy", default=None, choices=["keep", "offload", "free"],
                    help="default: keep, offload with a budget")  # fmt: skip
    ap.add_argument("--pinned", action="store_true", help="offload: keep a pinned CPU copy, upload from it")
    ap.add_argument("--no-kernels", action="store_true", help="skip the sparse-conv table")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="run each type N times; the table is the median run's")
    ap.add_argument("--log", default=None, help="append rows as JSON lines to this file")
    ap.add_argument("--fp8", action="store_true", help="DiT block weights in float8 e4m3 (the engine's fp8 option)")
    ap.add_argument("--no-graphs", action="store_true", help="sampling loops eager (TRELLIS2_CUDA_GRAPHS=0)")
    ap.add_argument("--attention", default=None, help="SDPA backend (TRELLIS2_ATTENTION_BACKEND); default auto")
    ap.add_argument("--trace", action="store_true", help="print every sampler model call: kind, host ms, gap")
    ap.add_argument("--gaps", action="store_true",
                    help="profile one more (plain) run: GPU busy time and its longest idle gaps")
    ap.add_argument("--vary-tokens", action="store_true",
                    help="repeat i scales the shell radius by 1 + 0.02 (i + 1): new token counts every run, as with "
                         "new images (first-call costs per shape: cuDNN plans, kernel variants)")  # fmt: skip
    ap.add_argument("--plain", type=int, default=0, metavar="N",
                    help="N more runs per type without the stage records (no per-stage syncs, no hooks): the wall "
                         "time a user's run sees")  # fmt: skip
    ap.add_argument("--syncs", action="store_true",
                    help="one more plain run under torch.cuda.set_sync_debug_mode: where the host waits for the GPU")
    ap.add_argument("--power", action="store_true",
                    help="sample SM clock, board power and the power-cap flag (nvidia-smi, every 50 ms): per stage "
                         "and per plain run")  # fmt: skip
    ap.add_argument("--host-trace", default=None, metavar="PREFIX",
                    help="profile one more plain run with CPU ops and Python stacks; Chrome trace to PREFIX.<type>.json")
    ap.add_argument("--memory-snapshot", default=None, metavar="FILE",
                    help="record allocations (Python stacks) and dump the allocator snapshot to FILE on OOM")
    ap.add_argument("--plan", action="store_true",
                    help="with --vram-budget: run under the engine's memory plan for it (streaming, chunked decoders)")  # fmt: skip
    args = ap.parse_args()
    if args.no_graphs:
        os.environ["TRELLIS2_CUDA_GRAPHS"] = "0"
    if args.attention:
        os.environ["TRELLIS2_ATTENTION_BACKEND"] = args.attention
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    if args.vram_budget:  # GiB, as the engine's vram_budget and memory plan count it
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_budget * GIB / props.total_memory))
    if args.memory_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    import triton

    global POWER
    POWER = PowerLog.start(dev) if args.power else None
    if args.power and POWER is None:
        emit("# --power: nvidia-smi not found or it cannot report the power-cap flag; no power columns")
    ceiling, sustained = matmul_ceiling(), matmul_ceiling(reps=400)
    torch.cuda.empty_cache()
    emit(f"# {props.name}, {props.total_memory / GIB:.0f} GiB, torch {torch.__version__}, triton {triton.__version__}, "
         f"sparse-conv backend auto -> {spconv.resolve_backend(dev)}; bf16 mm ceiling {ceiling:.0f} TFLOP/s (burst of "
         f"20; %ceil is against it), {sustained:.0f} sustained (400 back-to-back); "
         f"CUDA graphs {'off' if args.no_graphs else 'on'}; attention {args.attention or 'auto'}; "
         f"DiT weights {'fp8 e4m3' if args.fp8 else 'bf16'}",
         kind="device", name=props.name, ceiling=ceiling, sustained=sustained)  # fmt: skip
    if not args.no_kernels:
        conv_table(ceiling)
    policy = args.policy or ("offload" if args.vram_budget else "keep")
    mem_plan = None
    if args.plan:
        if not args.vram_budget or len(args.types) != 1:
            raise SystemExit("--plan needs --vram-budget and one --types entry")
        mem_plan = plan_memory(M.official_sizes(args.fp8), dev, args.vram_budget, pipeline_type=args.types[0])
        policy = mem_plan.policy
        if prefer_expandable_segments(dev):  # as the engine's components_for does under a budget
            emit("# allocator: expandable segments (the engine's choice under a budget)")
        emit(f"# memory plan: {mem_plan.summary()}")
    loaders = {role: (lambda r=role: M.build(r, dev, fp8=args.fp8)) for role in M.ROLES}
    comps = M.TimedComponents(loaders, dev, policy=policy, pinned=args.pinned, plan=mem_plan)
    M.CountingGraphedModel.counter = comps.counter
    guidance.GraphedModel = M.CountingGraphedModel  # replays run no hooks: count their FLOPs (see _models)
    gen = torch.Generator(device="cuda").manual_seed(1)
    cond = Conditioning(tokens={512: torch.randn(1, 1029, 1024, device=dev, generator=gen),
                                1024: torch.randn(1, 4101, 1024, device=dev, generator=gen)})  # fmt: skip
    if not args.no_warmup:  # compiles/autotunes kernels; loads (and, offloading, pins) every model the runs need
        warm = "1024_cascade" if any(plan(t).cascade for t in args.types) else "512"
        info = run_pipeline(warm, comps, cond)
        emit(f"\n(warm-up {warm}: {info['wall']:.2f} s)")
    for ptype in args.types:
        torch.cuda.reset_peak_memory_stats()
        try:
            runs = []
            for i in range(max(1, args.repeat)):
                M.CountingGraphedModel.trace = [] if args.trace else None
                info = run_pipeline(ptype, comps, cond, 1 + 0.02 * (i + 1) if args.vary_tokens else 1.0)
                if args.trace:
                    print_trace(ptype, info["wall"], M.CountingGraphedModel.trace)
                runs.append((info["wall"], info, list(comps.records)))
            if args.plain:
                with comps.plain():  # with --vary-tokens: shells no earlier run had
                    scales = [1 + 0.02 * (args.repeat + i + 1) if args.vary_tokens else 1.0 for i in range(args.plain)]
                    infos = []
                    for s in scales:
                        M.CountingGraphedModel.trace = [] if args.trace else None
                        infos.append(run_pipeline(ptype, comps, cond, s))
                        if args.trace:
                            print_trace(f"{ptype} plain", infos[-1]["wall"], M.CountingGraphedModel.trace)
                    infos.sort(key=lambda i: i["wall"])
                walls = [i["wall"] for i in infos]
                emit(f"\n{ptype}: {len(walls)} plain runs (no stage records), wall s " + " ".join(f"{w:.3f}" for w in walls),
                     kind="plain", ptype=ptype, walls=walls)  # fmt: skip
                if POWER:
                    emit("  per run (s, mean SM MHz, mean W, % of samples at the power cap): " + "; ".join(
                        f"{i['wall']:.3f}: {POWER.format(POWER.window(*i['at'])).strip()}" for i in infos))
            if args.syncs:
                print_syncs(ptype, comps, cond)
            if args.host_trace:
                from torch.profiler import ProfilerActivity, profile

                with comps.plain(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                    run_pipeline(ptype, comps, cond)
                path = f"{args.host_trace}.{ptype}.json"
                prof.export_chrome_trace(path)
                emit(f"\n# host trace of a plain {ptype} run (CPU ops with Python stacks, CUDA kernels): {path}")
            if args.gaps:
                with comps.plain(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    wall = run_pipeline(ptype, comps, cond)["wall"]
                print_gaps(ptype, wall, prof)
            runs.sort(key=lambda r: r[0])
            _, info, comps.records = runs[len(runs) // 2]
            if len(runs) > 1:
                emit(f"\n{ptype}: {len(runs)} runs, wall s " + " ".join(f"{w:.3f}" for w, _, _ in runs)
                     + ("; tokens (LR/final) " + " ".join(f"{r[1]['lr_tokens']}/{r[1]['hr_tokens']}" for r in runs)
                        if args.vary_tokens else ""),
                     kind="repeat", ptype=ptype, walls=[w for w, _, _ in runs])  # fmt: skip
            report(ptype, info, comps, ceiling, args.vram_budget)
        except torch.OutOfMemoryError as e:
            emit(f"\n## {ptype}: OOM ({str(e).splitlines()[0][:400]})", kind="oom", ptype=ptype, budget=args.vram_budget)
            where = [f for f in traceback.extract_tb(e.__traceback__) if "trellis2" in f.filename][-4:]
            emit("  raised in: " + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where)))
            if args.memory_snapshot:
                torch.cuda.memory._dump_snapshot(args.memory_snapshot)
                emit(f"  allocator snapshot (live blocks with Python stacks): {args.memory_snapshot}")
                print_live_blocks(torch.cuda.memory._snapshot())
            failed = dict(wall=float("nan"), lr_tokens=-1, hr_tokens=-1, resolution=-1, voxels=-1)
            report(ptype, failed, comps, ceiling, args.vram_budget)
        torch.cuda.empty_cache()
    if POWER:
        POWER.close()
    if args.log:
        with open(args.log, "a") as f:
            for row in LOG:
                f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
