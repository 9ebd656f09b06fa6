"""Timing helpers shared by the benchmark scripts (CUDA only)."""

import statistics

import torch


def cuda_time(fn, reps: int = 10, warm: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, timed with CUDA events after ``warm`` untimed runs."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def graph_time(fn, reps: int = 10, inner: int = 1) -> float:
    """Median seconds of one ``fn`` call: ``inner`` calls captured in a CUDA graph (after one warm-up call on a side
    stream), the replay timed with CUDA events ``reps`` times. Why: eager launches cost host time (Triton's
    launcher ~20-40 us each); the graph's time is the GPU's."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles / warms outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    try:
        return cuda_time(graph.replay, reps=reps, warm=1) / inner
    finally:
        del graph


def matmul_ceiling() -> float:
    """bf16 TFLOP/s of an 8192^3 torch.mm on random data (the matrix-unit ceiling of this GPU and stack)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = cuda_time(lambda: torch.mm(a, b), reps=20, warm=5)
    return 2 * 8192**3 / t / 1e12


def kernel_totals(prof) -> tuple[float, list[tuple[str, int, float]]]:
    """(busy ms, [(kernel name, calls, ms)] heaviest first) of the CUDA kernels a torch.profiler run recorded."""
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = agg.setdefault(e.name, [0, 0.0])
            row[0] += 1
            row[1] += e.device_time / 1e3
    rows = sorted(((name, n, ms) for name, (n, ms) in agg.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows
