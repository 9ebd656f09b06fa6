"""Timing helper shared by the benchmark scripts."""

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
