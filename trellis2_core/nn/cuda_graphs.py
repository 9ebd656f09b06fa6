"""CUDA-graph replay of a velocity model across the steps of one sampling loop (issue 7: the small-token regime).

Why: the sampler calls one flow model 12-22 times per stage on inputs of unchanging shapes. At ~3k tokens the
eager forward is bound by the host, not the GPU: ~740 kernel launches through Python took 75 ms where the GPU
needed 23 ms (H100, SLat DiT, 2,984 tokens, batch 1, ``bench/dit_probe.py``). A captured graph launches them all
at once; at 12k+ tokens the GPU is the bottleneck and a graph would only cost a capture and memory, so such keys
stay eager (below).

How: ``GraphedModel(model)`` is called like the model, ``(x, t, cond, **kwargs)``. Calls are grouped by a key: the
type, shape and dtype of every tensor argument, the coordinates (by identity) of every SparseTensor, the value of
every None/bool/int/float/str argument and the identity of every other one. The first call of a key runs eagerly
(unless the key is known to be host-bound: ``graph_policy.py``, "First calls"):
it creates the model's lazy state for those inputs (Triton compilation, cuDNN plans for the shapes, the
RoPE/varlen/batch-offset entries of the coordinate cache, module-level caches), which must not be created inside a
capture (some of it synchronises with the host; capturing a first-ever call fails on the GPU, checked with
``bench/host_probe.py --capture-first``). The second call captures a graph over static input buffers and replays
it; later calls copy their inputs into those buffers and replay. Outputs are copied out of the graph's memory (the
sampler holds the conditional velocity while computing the unconditional one).

When a graph pays (``graph_policy.py``): a key stays eager when it is GPU-bound (judged from its first call, or
known from a larger key of the same model), or when its batch size is expected too few calls; a key known to be
host-bound is captured at its first call, with no eager call before it.

Captures: ``torch.cuda.graph`` synchronises the device and empties the allocator's cache before capturing, so the
GPU runs dry and the capture's host time (one forward's launches, 45-60 ms at 3-4k tokens on an H100) is all
exposed. Captures here run on a side stream without waiting: the GPU works through what is already queued while
the host captures (H100, 2,984-token SLat, capture of the batch-1 key behind 8 queued batch-2 replays: 20-25 ms
exposed instead of 66 ms, ``bench/host_probe.py --overlap``). The cache is emptied first only when under
``TIGHT_MEMORY`` of the device is free.

Kept across loops (``keep=True``, the SS stage, whose shapes never change): ``close()`` hands the graphs to
``kept_graphs.py`` and the next loop's wrapper adopts them while the model's weights stay put (see there).

Memory: all graphs of one wrapper share one pool, freed by ``close()`` (or leaving ``with``). While the pool holds
the batched pair's activations the first (eager) call of the single-branch key allocates its own: up to ~1.5x an
eager stage's activations, which is what the memory planner allows for (``pipeline/memory.py`` GRAPH_HEADROOM; it
turns graphs off when that does not fit).

Only where it is safe: CUDA inputs; every parameter and buffer of the model on that device (not block-streamed
from CPU memory, not partially loaded by ComfyUI's low-VRAM mode); not inside another capture. A capture that
fails anyway is logged and graphs stay off for the rest of the process (the failure may leave torch's allocator
routing the capture stream into the graph's pool); the CUDA random generator, which torch would leave in capture
mode, is put back (``_rng_snapshot``). Replays run the same kernels as eager calls, so results are the same bit
for bit (checked on the GPU in tests/test_cuda_graphs.py).

Switch: ``GraphedModel(model, enabled=False)``, ``with cuda_graphs.disabled():`` (the CLI's ``--no-cuda-graphs``),
or the environment variable ``TRELLIS2_CUDA_GRAPHS=0`` (read on every call).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Callable, Mapping

import torch

from ..sparse import SparseTensor, batch_items
from . import kept_graphs
from .graph_policy import (
    LEARN_RATIO,
    MIN_CALLS,
    FirstCall,
    known_gpu_bound,
    known_host_bound,
    learn_gpu_bound,
    learn_host_bound,
)

logger = logging.getLogger(__name__)

ENV_VAR = "TRELLIS2_CUDA_GRAPHS"
_EAGER = object()  # marks a key that stays eager (GPU-bound, or its capture failed)
_DISABLED: list[str] = []  # set after a failed capture: no more captures in this process (see _capture)
_NO_FIRST_CAPTURE: list[str] = []  # set after a failed first-call capture: first calls run eagerly (see _capture)


_OFF = contextvars.ContextVar("trellis2_cuda_graphs_off", default=False)


@contextlib.contextmanager
def disabled():
    """No CUDA-graph capture or replay inside this block (eager calls only)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def graphs_enabled() -> bool:
    """False inside ``disabled()`` or when the environment variable TRELLIS2_CUDA_GRAPHS is "0", "off", "false" or
    "no" (both read at call time)."""
    if _OFF.get():
        return False
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "off", "false", "no")


class GraphedModel:
    """A velocity model whose repeated same-shape calls replay a CUDA graph; see the module docstring."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        enabled: bool = True,
        expected_calls: Mapping[int, int] | None = None,
        keep: bool = False,
    ):
        """expected_calls: {batch size: number of calls this loop will make}; batch sizes below MIN_CALLS stay
        eager (None: no such limit). keep: adopt the graphs an earlier loop kept for this model and keep this
        loop's at ``close()`` (module docstring, "Kept across loops")."""
        self.model = model
        self.enabled = enabled
        self.expected_calls = dict(expected_calls or {})
        self.keep = keep
        self.captures = 0
        self.replays = 0
        self.reused = 0  # graphs adopted from an earlier loop
        self.failed_captures = 0
        self.gpu_bound = 0  # keys left eager because the GPU was still busy with their first call
        self._entries: dict[tuple, Any] = {}
        self._resident: dict[torch.device, bool] = {}
        self._pool = None
        self._weights: tuple | None = None  # the model's weight fingerprint when its graphs were captured
        if keep:
            self._adopt()

    def __enter__(self) -> GraphedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free every graph and its memory, or with ``keep`` hand reusable ones to the model's next loop (the
        wrapper still works afterwards, eagerly until it captures again)."""
        if self.keep:
            self._keep()
        self._entries.clear()
        self._pool = None
        self._weights = None

    def _adopt(self) -> None:
        """Take the graphs an earlier loop kept for this model, if its weights are still the same tensors."""
        kept = kept_graphs.take(self.model)
        if kept is None or not self.enabled:
            return
        self._entries.update(kept.entries)
        self._pool, self._weights, self.reused = kept.pool, kept.weights, len(kept.entries)

    def _keep(self) -> None:
        graphs = {k: e for k, e in self._entries.items() if isinstance(e, _Entry)}
        if not graphs or self._weights is None or not all(kept_graphs.reusable(k) for k in graphs):
            return  # a sparse key's graph would only hold its pool's memory: free them all
        for entry in graphs.values():
            entry.keep, entry.eager_host_seconds, entry._timed = (), None, None
        kept_graphs.put(self.model, self._weights, self._pool, graphs)

    def __call__(self, x, t, cond, **kwargs):
        if not self._can_capture(x):
            return self.model(x, t, cond, **kwargs)
        args, names = (x, t, cond) + tuple(kwargs.values()), tuple(kwargs)
        key = self.key(x, t, cond, **kwargs)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._start(key, args, names)
            if isinstance(entry, FirstCall):  # eager, timed on the host and the GPU (graph_policy)
                out = self.model(x, t, cond, **kwargs)
                entry.finish()
                return out
        elif isinstance(entry, FirstCall):
            entry = self._judge(key, entry, args, names)
        elif entry is not _EAGER and entry.eager_host_seconds is not None and entry.clearly_host_bound():
            learn_host_bound(self.model, x)
        if entry is _EAGER:
            return self.model(x, t, cond, **kwargs)
        self.replays += 1
        return entry.run(args)

    def _start(self, key: tuple, args: tuple, names: tuple[str, ...]):
        """A new key's entry: _EAGER (too few calls, or known GPU-bound), a graph captured at once (known
        host-bound, ``graph_policy`` "First calls"), or the FirstCall of an eager call the caller makes right away."""
        x = args[0]
        host_bound = known_host_bound(self.model, x)
        capture_first = host_bound and not _NO_FIRST_CAPTURE
        calls = self.expected_calls.get(batch_items(x))
        if calls is not None and calls < (2 if capture_first else MIN_CALLS):
            self._entries[key] = _EAGER  # too few calls for a capture to pay
            return _EAGER
        if not host_bound and known_gpu_bound(self.model, x):
            self.gpu_bound += 1
            self._entries[key] = _EAGER
            return _EAGER
        if capture_first:
            entry = self._capture(key, args, names, first=True)
            if entry is not None:
                return entry
        first = self._entries[key] = FirstCall()  # starts its events: the caller runs the model next
        return first

    def _judge(self, key: tuple, first: FirstCall, args: tuple, names: tuple[str, ...]):
        """The key's second call: _EAGER (GPU-bound) or its captured graph (graph_policy)."""
        x = args[0]
        if not known_host_bound(self.model, x) and first.gpu_bound():  # a graph saves nothing
            learn_gpu_bound(self.model, x, first.ratio)
            self.gpu_bound += 1
            self._entries[key] = _EAGER
            logger.debug("CUDA graphs: key of %s left eager (GPU-bound)", type(self.model).__name__)
            return _EAGER
        entry = self._capture(key, args, names)
        if entry is not _EAGER:
            entry.eager_host_seconds = first.host_seconds  # its first replay is timed against this (learning)
        return entry

    @staticmethod
    def key(x, t, cond, **kwargs) -> tuple:
        """The graph key of a call (see the module docstring)."""
        return (tuple(kwargs), *(_signature(v) for v in (x, t, cond, *kwargs.values())))

    def _can_capture(self, x) -> bool:
        feats = x.feats if isinstance(x, SparseTensor) else x
        if not (self.enabled and isinstance(feats, torch.Tensor) and feats.is_cuda and graphs_enabled()):
            return False
        if _DISABLED:
            return False
        if torch.cuda.is_current_stream_capturing():
            return False
        return self._model_resident(feats.device)

    def _model_resident(self, device: torch.device) -> bool:
        """Every parameter and buffer of the model on ``device`` (checked once per device and wrapper)."""
        if device not in self._resident:
            model = self.model
            ok = isinstance(model, torch.nn.Module) and getattr(model, "_trellis2_streamer", None) is None
            if ok:
                tensors = [*model.parameters(), *model.buffers()]
                ok = all(p.device == device for p in tensors)
            if not ok:
                logger.debug("CUDA graphs off for %s: not wholly resident on %s", type(model).__name__, device)
            self._resident[device] = ok
        return self._resident[device]

    def _capture(self, key: tuple, args: tuple, names: tuple[str, ...], *, first: bool = False):
        """The key's entry, or _EAGER when capturing failed (logged; the key stays eager). first: the key's first
        call (no eager call before it); a failure then returns None (the key goes the eager-first way) and turns
        first-call captures off for the process, not graphs."""
        rng = _rng_snapshot(args[0])
        try:
            entry = _Entry(args)
            entry.copy_in(args)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            static = entry.static
            kwargs = dict(zip(names, static[3:]))
            if first:  # what the first call would create and may read back to the host: outside the capture
                prepare = getattr(self.model, "prepare_inputs", None)
                if prepare is not None:
                    prepare(static[0])
            run = lambda: self.model(static[0], static[1], static[2], **kwargs)  # noqa: E731
            out = _capture_behind_queue(graph, self._pool, run, _device(args[0]))
            entry.graph, entry.out = graph, out
            if self.keep and self._weights is None:
                self._weights = kept_graphs.fingerprint(self.model)  # None (never kept) for a plain callable
        except Exception as e:  # capture is an optimisation: any failure -> eager, logged
            self.failed_captures += 1
            _rng_restore(rng)
            _capture_streams.clear()  # the allocator may still route the failed capture's stream into its pool
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if first:
                _NO_FIRST_CAPTURE.append(reason)
                logger.warning("CUDA graph capture of a first call of %s failed (%s); first calls run eagerly "
                               "from now on", type(self.model).__name__, reason)  # fmt: skip
                return None
            # A failed capture may leave torch's allocator routing the capture stream into the graph's pool, so
            # no further capture is tried in this process; eager calls on the compute stream are unaffected, and
            # the CUDA random generator is put back (_rng_snapshot says why).
            _DISABLED.append(reason)
            logger.warning("CUDA graph capture of %s failed (%s); CUDA graphs are off for the rest of this process",
                           type(self.model).__name__, reason)  # fmt: skip
            self._entries[key] = _EAGER
            return _EAGER
        self.captures += 1
        self._entries[key] = entry
        return entry


_capture_streams: dict[int, torch.cuda.Stream] = {}
TIGHT_MEMORY = 0.25  # below this fraction of the device's memory free, empty the allocator's cache first


def _capture_behind_queue(graph: torch.cuda.CUDAGraph, pool, fn: Callable[[], Any], device: torch.device) -> Any:
    """Capture ``fn()`` into ``graph`` on a side stream without waiting for the GPU (module docstring, "Captures").

    torch.cuda.graph synchronises the device and empties the allocator's cache before every capture: the GPU runs
    dry, and the capture's host time (one forward's worth of launches) is all exposed. Here the GPU keeps working
    through the replays and eager calls already queued while the host captures; the cache is emptied (with its
    synchronisation) only when free device memory is tight, so the graph's pool can still be allocated."""
    device = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    if free < TIGHT_MEMORY * total:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    side = _capture_streams.get(device)
    if side is None:
        side = _capture_streams[device] = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            graph.capture_end()
    main.wait_stream(side)
    return out


def _device(x) -> torch.device:
    return (x.feats if isinstance(x, SparseTensor) else x).device


def _rng_snapshot(x):
    """(generator, cloned state) of the device's default CUDA generator, or None (torch < 2.4).

    Why: a capture registers that generator and puts it in capture mode; if the capture fails, torch never takes
    it out again, and every later CUDA random draw in the process raises "Offset increment outside graph capture"
    (H100, torch 2.11). Swapping in a state cloned before the capture undoes that."""
    feats = x.feats if isinstance(x, SparseTensor) else x
    index = feats.device.index if feats.device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[index]
    if not (hasattr(gen, "clone_state") and hasattr(gen, "graphsafe_set_state")):
        return None
    return gen, gen.clone_state()


def _rng_restore(snapshot) -> None:
    if snapshot is not None:
        gen, state = snapshot
        gen.graphsafe_set_state(state)


def _signature(v: Any) -> tuple:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.dtype, v.device)
    if isinstance(v, SparseTensor):
        return ("S", tuple(v.feats.shape), v.feats.dtype, v.feats.device, id(v.coords), v.coords.data_ptr())
    if v is None or isinstance(v, (bool, int, float, str)):
        return ("V", type(v), v)
    return ("O", id(v))


class _Entry:
    """Static inputs of one captured call, the graph, and its output (in the graph's memory)."""

    def __init__(self, args: tuple):
        self.keep = args  # holds the coordinates and other arguments the key names by identity
        self.static = tuple(_static(v) for v in args)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None
        self.eager_host_seconds: float | None = None  # host time of the key's eager first call, until judged
        self._timed: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def clearly_host_bound(self) -> bool:
        """Once the first replay has finished (never waits): its GPU time was under ``LEARN_RATIO`` x the eager
        first call's host time. Judged once; False while unknown."""
        if self._timed is None or not self._timed[1].query():
            return False
        start, end = self._timed
        busy = start.elapsed_time(end) / 1e3
        verdict = busy < LEARN_RATIO * self.eager_host_seconds
        self.eager_host_seconds = None
        return verdict

    def copy_in(self, args: tuple) -> None:
        for dst, src in zip(self.static, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
            elif isinstance(dst, SparseTensor):
                dst.feats.copy_(src.feats)

    def run(self, args: tuple):
        self.copy_in(args)
        if self.eager_host_seconds is not None and self._timed is None:
            self._timed = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._timed[0].record()
            self.graph.replay()
            self._timed[1].record()
        else:
            self.graph.replay()
        out, x = self.out, args[0]
        if isinstance(out, SparseTensor):
            return x.replace(out.feats.clone()) if isinstance(x, SparseTensor) else out.replace(out.feats.clone())
        return out.clone()


def _static(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if isinstance(v, SparseTensor):
        return v.replace(torch.empty(v.feats.shape, dtype=v.feats.dtype, device=v.feats.device))
    return v
