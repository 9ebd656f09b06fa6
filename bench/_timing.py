"""Timing helpers shared by the benchmark scripts (CUDA only)."""

import datetime
import shutil
import statistics
import subprocess
import tempfile

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


def matmul_ceiling(reps: int = 20) -> float:
    """bf16 TFLOP/s of an 8192^3 torch.mm on random data (the matrix-unit ceiling of this GPU and stack): the
    median of ``reps`` back-to-back products. 20 (~30 ms) is a burst; a few hundred run long enough for the
    board's power limit to lower the clocks (H100 SXM, 700 W: 771 -> 671 TFLOP/s)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = cuda_time(lambda: torch.mm(a, b), reps=reps, warm=5)
    return 2 * 8192**3 / t / 1e12


class PowerLog:
    """SM clock, board power and the power-cap throttle flag of one GPU, sampled every ``ms`` by ``nvidia-smi`` in a
    process of its own (no GIL shared with the run it watches). ``window(t0, t1)`` summarises the samples between two
    ``time.time()`` stamps. ``PowerLog.start(device)`` is None where nvidia-smi is missing."""

    FIELDS = ("clocks_event_reasons.sw_power_cap", "clocks_throttle_reasons.sw_power_cap")  # newer, older drivers
    POWER = ("power.draw.instant", "power.draw")  # instantaneous where the driver has it (power.draw: a 1 s average)

    def __init__(self, uuid: str, ms: int, cap_field: str, power_field: str):
        self._out = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        query = f"timestamp,clocks.sm,{power_field},{cap_field}"
        cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", str(ms), "-i", uuid]
        self._proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.DEVNULL)

    @classmethod
    def start(cls, device: torch.device, ms: int = 50) -> "PowerLog | None":
        if shutil.which("nvidia-smi") is None:
            return None
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"

        def first(fields):
            for field in fields:
                probe = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", uuid],
                                       capture_output=True, text=True)  # fmt: skip
                if probe.returncode == 0 and "N/A" not in probe.stdout and "Not Supported" not in probe.stdout:
                    return field
            return None

        cap, power = first(cls.FIELDS), first(cls.POWER)
        return None if cap is None or power is None else cls(uuid, ms, cap, power)

    def window(self, t0: float, t1: float) -> dict | None:
        """Mean SM MHz, mean W and the share of samples at the power cap between t0 and t1 (None: no sample)."""
        self._out.flush()
        rows = []
        with open(self._out.name) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                try:
                    at = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    rows.append((at, float(parts[1]), float(parts[2]), parts[3].lower() == "active"))
                except (ValueError, IndexError):
                    continue
        inside = [r for r in rows if t0 <= r[0] <= t1]
        if not inside:
            return None
        n = len(inside)
        return dict(mhz=sum(r[1] for r in inside) / n, watts=sum(r[2] for r in inside) / n,
                    cap=sum(r[3] for r in inside) / n, samples=n)  # fmt: skip

    @staticmethod
    def format(w: dict | None) -> str:
        return "  (no samples)" if w is None else f"{w['mhz']:6.0f} {w['watts']:5.0f} {100 * w['cap']:5.0f}"

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait()
        self._out.close()


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
