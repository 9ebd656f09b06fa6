"""CUDA-graph replay of the flow models in the sampling loop (trellis2_core/nn/cuda_graphs.py).

CPU: the wrapper is a plain pass-through (nothing to capture). CUDA: replays equal eager calls bit for bit, keys
separate shapes/coordinates, models that are not wholly on the GPU (block streaming) stay eager, the environment
switch turns it off, and whole pipelines give identical results with and without graphs.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_GRAPH_DIT, block_image, random_model, random_sparse
from trellis2.trellis2_core.nn import cuda_graphs, graph_policy
from trellis2.trellis2_core.nn.cuda_graphs import ENV_VAR, GraphedModel, graphs_enabled
from trellis2.trellis2_core.nn.streaming import stream_blocks, unstream
from trellis2.trellis2_core.sparse import SparseTensor

def _model(name: str, device: str, **args) -> torch.nn.Module:
    return random_model(name, TINY_GRAPH_DIT, device=device, **args)


def _sparse(lengths, channels, device, seed=1, res=12):
    return random_sparse(lengths, channels, res=res, seed=seed).to(device)


def _feats(v):
    return v.feats if isinstance(v, SparseTensor) else v


def test_env_switch_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert graphs_enabled()
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(ENV_VAR, off)
        assert not graphs_enabled()
    monkeypatch.setenv(ENV_VAR, "1")
    assert graphs_enabled()
    with cuda_graphs.disabled():
        assert not graphs_enabled()
        with cuda_graphs.disabled():
            assert not graphs_enabled()
        assert not graphs_enabled()
    assert graphs_enabled()


def test_cpu_calls_pass_straight_through():
    m = _model("SparseStructureFlowModel", "cpu", dtype="float32")
    graphed = GraphedModel(m)
    x, t, cond = torch.randn(2, 8, 4, 4, 4), torch.tensor([900.0, 300.0]), torch.randn(2, 3, 16)
    with torch.no_grad():
        outs = [graphed(x, t, cond) for _ in range(3)]
        ref = m(x, t, cond)
    assert all(torch.equal(o, ref) for o in outs)
    assert graphed.captures == 0 and graphed.replays == 0


@pytest.mark.cuda
def test_cuda_replays_equal_eager_bit_for_bit_and_keys_separate_shapes():
    m = _model("SparseStructureFlowModel", "cuda")
    graphed = GraphedModel(m)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for step in range(4):
            for b in (2, 1):
                x = torch.randn(b, 8, 4, 4, 4, device="cuda", generator=g)
                t = torch.full((b,), 1000.0 - 200 * step, device="cuda")
                cond = torch.randn(b, 3, 16, device="cuda", generator=g)
                out = graphed(x, t, cond)
                assert torch.equal(out, m(x, t, cond)), f"step {step} batch {b}"
    # each key (batch size) runs eagerly once, is captured on its second call, then replays
    assert graphed.captures == 2 and graphed.replays == 6 and graphed.failed_captures == 0
    graphed.close()
    assert graphed.captures == 2 and not graphed._entries


@pytest.mark.cuda
def test_cuda_sparse_models_replay_with_their_coordinates_and_kwargs():
    m = _model("SLatFlowModel", "cuda", in_channels=16)
    graphed = GraphedModel(m)
    for lengths in ([40, 40], [19, 12]):  # dense view (shared lengths) and the packed varlen path
        x = _sparse(lengths, 8, "cuda")
        shape = _sparse(lengths, 8, "cuda", seed=5)
        shape = SparseTensor(shape.feats, x.coords)
        with torch.no_grad():
            for step in range(3):
                if step == 2:
                    torch.cuda.synchronize()  # the key's timed first replay has finished: read at this call
                xs = x.replace(torch.randn_like(x.feats))
                t = torch.full((len(lengths),), 900.0 - 300 * step, device="cuda")
                cond = torch.randn(len(lengths), 3, 16, device="cuda")
                out = graphed(xs, t, cond, concat_cond=shape)
                ref = m(xs, t, cond, concat_cond=shape)
                assert out.coords is xs.coords
                assert torch.equal(out.feats, ref.feats), (lengths, step)
    assert graphed.captures == 2 and graphed.replays == 5 and graphed.failed_captures == 0  # 2nd: captured at once
    # other coordinates of the same size are another key, known host-bound: captured at its first call, with the
    # batch offsets and packed layout of its fresh coordinate cache built before the capture (prepare_inputs)
    y = _sparse([19, 12], 8, "cuda", seed=9)
    ys = SparseTensor(torch.randn_like(y.feats), y.coords)
    with torch.no_grad():
        out = graphed(y, t, cond, concat_cond=ys)
        assert torch.equal(out.feats, m(y, t, cond, concat_cond=ys).feats)
    assert graphed.captures == 3 and graphed.failed_captures == 0 and y.get_cache("trellis2.varlen_layout") is not None


class _Heavy(torch.nn.Module):
    """Little host work, a lot of GPU work (100 chained 4096^2 matmuls): the GPU is always far behind the host."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64)

    def forward(self, x, t, cond):
        for _ in range(100):
            x = torch.tanh(x @ self.w)
        return x


@pytest.mark.cuda
def test_cuda_gpu_bound_keys_stay_eager():
    m = _Heavy()
    graphed = GraphedModel(m)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m(x, None, None)  # cuBLAS set-up outside the timed first call
        torch.cuda.synchronize()
        outs = [graphed(x, None, None) for _ in range(4)]  # no sync between calls: the host stays ahead
        ref = m(x, None, None)
    assert graphed.captures == 0 and graphed.gpu_bound == 1 and graphed.replays == 0
    assert all(torch.equal(o, ref) for o in outs)
    assert graph_policy.GPU_BOUND[m][0] == x.numel()
    # half the rows of a GPU-bound key: eager too (known from the scaled ratio, or judged far behind at once)
    with torch.no_grad():
        halves = [graphed(x[:2048], None, None) for _ in range(3)]
        assert all(torch.equal(h, m(x[:2048], None, None)) for h in halves)
    assert graphed.captures == 0 and graphed.gpu_bound == 2
    # a known ratio scales: a key of a quarter the elements at 8x the ratio threshold is never judged
    graph_policy.GPU_BOUND[m] = (x.numel(), 8 * graph_policy.GPU_BOUND_RATIO)
    with torch.no_grad():
        graphed(x[:1024], None, None)
    assert graphed.gpu_bound == 3 and not any(isinstance(e, graph_policy.FirstCall) for e in graphed._entries.values())


@pytest.mark.cuda
def test_cuda_host_bound_keys_are_captured_without_syncs_between_calls():
    m = _model("SparseStructureFlowModel", "cuda")
    graphed = GraphedModel(m)
    x, t, cond = torch.randn(2, 8, 4, 4, 4, device="cuda"), torch.tensor([900.0, 900.0], device="cuda"), torch.randn(2, 3, 16, device="cuda")
    with torch.no_grad():
        outs = [graphed(x, t, cond) for _ in range(4)]  # back to back, as in the sampler
        ref = m(x, t, cond)
    assert graphed.captures == 1 and graphed.gpu_bound == 0 and graphed.replays == 3
    assert all(torch.equal(o, ref) for o in outs)


@pytest.mark.cuda
@pytest.mark.parametrize("tight", [False, True])
def test_cuda_smaller_keys_after_a_host_bound_one_are_captured_without_judging(monkeypatch, tight):
    """The single-branch key after the guided pair's: captured at its second call without waiting for (judging) its
    first; with tight memory the cache is emptied before the capture (same results either way)."""
    m = _model("SparseStructureFlowModel", "cuda")
    graphed = GraphedModel(m)
    judged = []
    real = graph_policy.FirstCall.gpu_bound
    monkeypatch.setattr(graph_policy.FirstCall, "gpu_bound", lambda self: judged.append(1) or real(self))
    monkeypatch.setattr(cuda_graphs, "TIGHT_MEMORY", 1.01 if tight else 0.0)  # 1.01: always "tight"
    emptied = []
    real_empty = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1) or real_empty())
    with torch.no_grad():
        for i, b in enumerate((2, 2, 2, 2, 1, 1, 1)):
            if i == 3:
                torch.cuda.synchronize()  # the timed first replay has finished: learnt at the next call
            x, t, cond = torch.randn(b, 8, 4, 4, 4, device="cuda"), torch.full((b,), 700.0, device="cuda"), torch.randn(b, 3, 16, device="cuda")
            assert torch.equal(graphed(x, t, cond), m(x, t, cond))
    assert judged == [1]  # only the batch-2 key was judged; batch 1 was captured at its first call
    assert graphed.captures == 2 and graphed.replays == 6 and graphed.gpu_bound == 0
    assert len(emptied) == (2 if tight else 0)


@pytest.mark.cuda
def test_cuda_later_loops_capture_known_host_bound_keys_at_their_first_call():
    m = _model("SparseStructureFlowModel", "cuda")
    x, t, cond = torch.randn(2, 8, 4, 4, 4, device="cuda"), torch.full((2,), 700.0, device="cuda"), torch.randn(2, 3, 16, device="cuda")
    with torch.no_grad():
        with GraphedModel(m) as first:
            for i in range(4):
                if i == 3:
                    torch.cuda.synchronize()
                first(x, t, cond)
        assert first.captures == 1  # eager, then captured after the judgement; the timed replay: host-bound
        with GraphedModel(m) as later:
            out = later(x, t, cond)
            assert later.captures == 1 and later.replays == 1  # no eager call first
            assert torch.equal(out, m(x, t, cond))
            near = torch.randn(3, 8, 4, 4, 4, device="cuda")  # 1.5x the learnt size (the next image's): captured
            out = later(near, torch.full((3,), 700.0, device="cuda"), torch.randn(3, 3, 16, device="cuda"))
            assert later.captures == 2 and later.replays == 2
            big = torch.randn(4, 8, 4, 4, 4, device="cuda")  # beyond the margin: eager first again
            later(big, torch.full((4,), 700.0, device="cuda"), torch.randn(4, 3, 16, device="cuda"))
            assert later.captures == 2


@pytest.mark.cuda
def test_cuda_failed_first_call_capture_runs_eagerly_and_keeps_graphs_on(caplog):
    m = _Syncing()
    graph_policy.HOST_BOUND[m] = 10**9  # pretend it was judged host-bound: its first call is captured, and fails
    try:
        graphed = GraphedModel(m)
        x, t = torch.randn(3, 4, device="cuda"), torch.full((1,), 2.0, device="cuda")
        with torch.no_grad():
            assert torch.equal(graphed(x, t, None), m(x, t, None))
        assert graphed.failed_captures == 1 and not cuda_graphs._DISABLED
        assert "first calls run eagerly from now on" in caplog.text
        other = GraphedModel(_model("SparseStructureFlowModel", "cuda"))
        x, t, cond = torch.randn(1, 8, 4, 4, 4, device="cuda"), torch.tensor([500.0], device="cuda"), torch.randn(1, 3, 16, device="cuda")
        with torch.no_grad():
            outs = [other(x, t, cond) for _ in range(3)]
        assert other.captures == 1 and torch.equal(outs[0], outs[2])  # graphs still work (eager-first)
    finally:
        cuda_graphs._NO_FIRST_CAPTURE.clear()


@pytest.mark.cuda
def test_cuda_batch_sizes_with_few_expected_calls_stay_eager():
    m = _model("SparseStructureFlowModel", "cuda")
    graphed = GraphedModel(m, expected_calls={1: 2, 2: 9})
    assert graph_policy.MIN_CALLS > 2
    with torch.no_grad():
        for step in range(4):
            for b in (2, 1):
                x = torch.randn(b, 8, 4, 4, 4, device="cuda")
                t, cond = torch.full((b,), 900.0 - 100 * step, device="cuda"), torch.randn(b, 3, 16, device="cuda")
                assert torch.equal(graphed(x, t, cond), m(x, t, cond))
    assert graphed.captures == 1 and graphed.replays == 3  # batch 2 only


class _Syncing(torch.nn.Module):
    """Reads a value back to the host in every forward: never capturable."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 2.0, device="cuda"))

    def forward(self, x, t, cond):
        return x * self.w * float(t.sum().item())


@pytest.mark.cuda
def test_cuda_failed_captures_fall_back_to_eager_and_cuda_stays_usable(caplog):
    try:
        _failed_capture_checks(caplog)
    finally:
        cuda_graphs._DISABLED.clear()  # later tests capture again
        cuda_graphs._NO_FIRST_CAPTURE.clear()


def _failed_capture_checks(caplog):
    m = _Syncing()
    # known host-bound (a judgement of a microsecond call is noise) and no first-call captures: eager, then a
    # capture at the second call, which fails
    graph_policy.HOST_BOUND[m] = 10**9
    cuda_graphs._NO_FIRST_CAPTURE.append("test")
    graphed = GraphedModel(m)
    with torch.no_grad():
        for i in range(5):
            x, t = torch.randn(3, 4, device="cuda"), torch.full((1,), float(i + 1), device="cuda")
            assert torch.equal(graphed(x, t, None), m(x, t, None))
    assert graphed.captures == 0 and graphed.failed_captures == 1  # first call eager, one failed capture
    assert "CUDA graphs are off for the rest of this process" in caplog.text
    torch.cuda.manual_seed(7)
    y = torch.randn(64, 64, device="cuda")  # the CUDA generator left capture mode (torch would raise otherwise)
    torch.cuda.manual_seed(7)
    assert torch.equal(y, torch.randn(64, 64, device="cuda"))
    assert torch.allclose((y @ y).cpu(), y.cpu() @ y.cpu(), rtol=1e-3, atol=1e-3)
    other = GraphedModel(_model("SparseStructureFlowModel", "cuda"))
    x, t = torch.randn(1, 8, 4, 4, 4, device="cuda"), torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        for _ in range(3):
            other(x, t, torch.randn(1, 3, 16, device="cuda"))
    assert other.captures == 0  # off for the process


@pytest.mark.cuda
def test_cuda_streamed_models_and_the_env_switch_stay_eager(monkeypatch):
    m = _model("SparseStructureFlowModel", "cpu")
    stream_blocks(m, "cuda")
    graphed = GraphedModel(m)
    x, t, cond = torch.randn(1, 8, 4, 4, 4, device="cuda"), torch.tensor([500.0], device="cuda"), torch.randn(1, 3, 16, device="cuda")
    with torch.no_grad():
        outs = [graphed(x, t, cond) for _ in range(3)]
    assert graphed.captures == 0 and torch.equal(outs[0], outs[2])
    unstream(m)
    m = _model("SparseStructureFlowModel", "cuda")
    monkeypatch.setenv(ENV_VAR, "0")
    graphed = GraphedModel(m)
    with torch.no_grad():
        for _ in range(3):
            graphed(x, t, cond)
    assert graphed.captures == 0


@pytest.mark.cuda
def test_cuda_pipeline_with_and_without_graphs_is_identical(tmp_path, monkeypatch):
    from trellis2.trellis2_core.pipeline import Trellis2Pipeline
    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    root = write_tiny_snapshot(tmp_path / "tiny")
    pipe = Trellis2Pipeline.from_pretrained(root, device="cuda", allow_download=False)
    image = block_image()
    fast = {stage: {"steps": 4} for stage in ("sparse_structure", "shape_slat", "tex_slat")}
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv(ENV_VAR, env)
        out = pipe.generate(image, seed=5, pipeline_type="512", sampler_overrides=fast)
        results.append(out)
    a, b = results
    assert torch.equal(a.structure.coords, b.structure.coords)
    assert torch.equal(a.shape.latent.coords, b.shape.latent.coords)
    assert torch.equal(a.shape.latent.feats, b.shape.latent.feats)
    assert torch.equal(_feats(a.material.latent), _feats(b.material.latent))


def test_host_bound_verdicts_extend_to_the_next_images_size_unless_known_gpu_bound():
    model = torch.nn.Linear(1, 1)  # any weakly referable object: verdicts are kept per model
    x = lambda rows: torch.empty(rows, 8)  # noqa: E731
    assert not graph_policy.known_host_bound(model, x(1))  # nothing learnt yet
    graph_policy.learn_host_bound(model, x(1000))
    assert graph_policy.known_host_bound(model, x(400)) and graph_policy.known_host_bound(model, x(1000))
    margin = int(graph_policy.HOST_MARGIN * 1000)
    assert graph_policy.known_host_bound(model, x(margin)) and not graph_policy.known_host_bound(model, x(margin + 1))
    graph_policy.learn_gpu_bound(model, x(4000), 4 * graph_policy.GPU_BOUND_RATIO)  # at 1,300 rows: 1.6 > 1.25
    assert graph_policy.known_gpu_bound(model, x(1300))
    assert not graph_policy.known_host_bound(model, x(1300))  # within the margin, but the GPU-bound scaling says no
    assert graph_policy.known_host_bound(model, x(1000))  # what was measured host-bound stays so
