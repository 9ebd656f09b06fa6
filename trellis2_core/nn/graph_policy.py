"""When a CUDA graph pays for a key of ``cuda_graphs.GraphedModel`` (issue 7), and what is learnt per model.

Measured on an H100 (``bench/bench_pipeline.py --trace``): below ~5k tokens a DiT forward is bound by the host
(50-250 ms to enqueue ~900 launches for 20-46 ms of GPU work), at 12k+ tokens by the GPU (~230 ms of GPU work for a
75 ms enqueue), where a graph saves nothing and its pool would hold a second copy of the activations.

A key stays eager when a graph would not pay:
- GPU-bound keys. The first call is bracketed by CUDA events and timed on the host; at the key's second call the
  wrapper reads the GPU's time between the events. GPU-bound (graphs save nothing, and the pool would hold a
  second copy of the forward's activations): the GPU took over ``GPU_BOUND_RATIO`` x the host's time (12k+ tokens
  on a GPU that starts idle: ~230 ms for a 75 ms enqueue on an H100), or it is still busy with the call ``BEHIND``
  x its host time after the call returned (a host held up by a full launch queue takes the GPU's time, so the
  ratio says nothing; and waiting for the call would drain the queue and leave the GPU idle through a capture).
  Host-bound: the GPU keeps pace with the host and ends a kernel or two behind; work queued before the call only
  delays the start event. (A bare "done yet?" at the second call raced with the last kernels and misjudged
  3-4k-token keys; waiting for the call misjudged the single-branch key of a 12k-token stage, queued behind the
  guided pair's last call, as host-bound and captured it with the GPU idle.) Results do not depend on the
  choice (replays equal eager calls bit for bit). A key no larger (input elements) than one of the same
  model already found host-bound is host-bound too (fewer rows, the same launches): it is never judged, so no
  wait for queued work (the single-branch steps after the guided ones).
- Batch sizes called only a few times: ``expected_calls`` {batch size: calls in this loop} (the sampler knows its
  schedule, ``pipeline/guidance.py``); a batch size expected fewer than ``MIN_CALLS`` times stays eager. The first
  call and the capture each cost about one eager call of host time, so 2 calls (the SS stage's unguided steps)
  come out slower with a graph than without; 3 (the shape stage's) slightly faster. H100, 4096 tokens, batch 1:
  eager call 70-95 ms of host time, capture ~60 ms, replay 27 ms (``bench/bench_pipeline.py --trace``). A key
  captured at its first call (known host-bound, below) pays from 2 calls on.
- Keys known to be GPU-bound: the GPU/host ratio of the model's smallest key judged GPU-bound, scaled by input
  elements, is still over ``GPU_BOUND_RATIO`` (the single-branch half of a 12k-token guided pair): eager, unjudged.
  (Judging it would wait behind the pair's queued work, and a host held up by the full launch queue looks slow.)

First calls: a key no larger than ``HOST_MARGIN`` x an input of the same model already found clearly host-bound
(in this loop or an earlier one: learnt per model object for the life of the process, when a key's first replay
took the GPU under ``LEARN_RATIO`` x the host time of its eager first call; the replay is timed with events read
without waiting), and not known GPU-bound, skips the eager first call and is captured at once. The margin is for
the next image: its token count differs from the last one's by a few tens of percent either way, and a larger one
would otherwise pay an eager call and a capture again (H100, 1024_cascade with new token counts every run, the LR
shape stage at 7,456 rows after 7,360 were learnt: an eager call of 248 ms of host time before its capture); the model's ``prepare_inputs(x)`` first builds what a first
call would create and read back to the host (the batch offsets, RoPE phases and packed layout cached on new
coordinates). An eager first call of a host-bound key
costs its host time (50-150 ms at 3-6k tokens on an H100's host) while the GPU needs 20-46 ms; from the second
generation on, each stage pays one capture instead. A first-call capture that fails runs the call eagerly and
turns first-call captures (not graphs) off for the process.

What is learnt is kept per model object (weak references) for the life of the process: ``HOST_BOUND`` the largest
input found clearly host-bound, ``GPU_BOUND`` the smallest found GPU-bound with its GPU/host ratio. Input size is
counted in elements (one model and channel count per key family), a proxy for the rows of work a call queues.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..sparse import SparseTensor

MIN_CALLS = 3  # a batch size expected fewer calls than this per loop stays eager
HOST_MARGIN = 1.5  # up to this x the largest input learnt host-bound counts as host-bound (the next image's size)
GPU_BOUND_RATIO = 1.25  # first call's GPU time over its host time above this: GPU-bound
BEHIND = 0.3  # the GPU still busy with a first call this long (x its host time) after it returned: GPU-bound
LEARN_RATIO = 0.8  # a replay's GPU time under this x the eager call's host time: learnt host-bound
HOST_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> largest host-bound input (elements)
GPU_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (smallest GPU-bound input, GPU/host)


def known_host_bound(model, x) -> bool:
    """x is no larger than an input of ``model`` already found host-bound (in this or an earlier loop), or within
    ``HOST_MARGIN`` of it and not known GPU-bound."""
    try:
        largest = HOST_BOUND.get(model, 0)
    except TypeError:  # a model that cannot be weakly referenced: nothing learnt
        return False
    n = size(x)
    return n <= largest or (n <= HOST_MARGIN * largest and not known_gpu_bound(model, x))


def known_gpu_bound(model, x) -> bool:
    """Scaling the GPU/host time ratio of ``model``'s smallest key judged GPU-bound to x's size by the input
    elements still gives a GPU-bound ratio (the guided pair's half: the single-branch key at 12k+ tokens)."""
    try:
        known = GPU_BOUND.get(model)
    except TypeError:
        return False
    return known is not None and known[1] * size(x) / known[0] > GPU_BOUND_RATIO


def learn_gpu_bound(model, x, ratio: float) -> None:
    try:
        known = GPU_BOUND.get(model)
        if known is None or size(x) < known[0]:
            GPU_BOUND[model] = (size(x), ratio)
    except TypeError:
        pass


def learn_host_bound(model, x) -> None:
    try:
        HOST_BOUND[model] = max(HOST_BOUND.get(model, 0), size(x))
    except TypeError:
        pass


def size(x) -> int:
    """Input elements of a call (the rows of work it queues; one model and channel count per wrapper)."""
    return (x.feats if isinstance(x, SparseTensor) else x).numel()


class FirstCall:
    """The first (eager) call of a key: CUDA events around its GPU work and the host's time to issue it."""

    def __init__(self):
        self.start, self.done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()
        self._t0 = time.perf_counter()
        self.host_seconds = 0.0
        self.ratio = 0.0  # the GPU's time over the host's, once judged

    def finish(self) -> None:
        self._t_done = time.perf_counter()
        self.host_seconds = self._t_done - self._t0
        self.done.record()

    def gpu_bound(self) -> bool:
        """Judges once the call's GPU work is done (module docstring), waiting for it until ``BEHIND`` x the call's
        host time after the call returned: still running then, the GPU is that far behind the host: GPU-bound,
        without draining the queue."""
        host = max(self.host_seconds, 1e-9)
        deadline = self._t_done + BEHIND * host
        while not self.done.query():
            now = time.perf_counter()
            if now > deadline:
                self.ratio = 0.0  # unknown (more than 1 + BEHIND): nothing to scale to other keys
                return True
            time.sleep(min(2e-4, deadline - now))
        gpu = self.start.elapsed_time(self.done) / 1e3
        self.ratio = gpu / host
        return gpu > GPU_BOUND_RATIO * host
