"""CUDA-graph replay of the flow models in the sampling loop (trellis2_core/nn/cuda_graphs.py).

CPU: the wrapper is a plain pass-through (nothing to capture). CUDA: replays equal eager calls bit for bit, keys
separate shapes/coordinates, models that are not wholly on the GPU (block streaming) stay eager, the environment
switch turns it off, and whole pipelines give identical results with and without graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.nn import cuda_graphs, graph_policy
from trellis2.trellis2_core.nn.cuda_graphs import ENV_VAR, GraphedModel, graphs_enabled
from trellis2.trellis2_core.nn.streaming import stream_blocks, unstream
from trellis2.trellis2_core.sparse import SparseTensor

TINY = {
    "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 64, "cond_channels": 16,
    "num_blocks": 2, "num_heads": 2, "mlp_ratio": 4.0, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "bfloat16",
}  # fmt: skip


def _model(name: str, device: str, **args) -> torch.nn.Module:
    torch.manual_seed(0)
    m = from_config({"name": name, "args": {**TINY, **args}}, device=device).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def _sparse(lengths, channels, device, seed=1, res=12):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(lengths):
        cells = torch.randperm(res**3, generator=g)[:n].sort().values
        xyz = torch.stack([cells // (res * res), cells // res % res, cells % res], dim=1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords).to(device)


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
    rgba = np.zeros((96, 80, 4), np.uint8)
    rgba[20:70, 15:60] = (200, 60, 30, 255)
    image = Image.fromarray(rgba, "RGBA")
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


# ---------------------------------------------------------------------------------------- graphs kept across loops
def _fake_capture(graphed: GraphedModel, *args, **kwargs) -> tuple:
    """Book a captured entry for this call as _capture would (no GPU: the bookkeeping of keeping is what's tested)."""
    key = graphed.key(*args, **kwargs)
    graphed._entries[key] = cuda_graphs._Entry(args + tuple(kwargs.values()))
    graphed._pool = graphed._pool or ("pool",)
    if isinstance(graphed.model, torch.nn.Module):
        graphed._weights = graphed._weights or cuda_graphs._weight_fingerprint(graphed.model)
    return key


def test_kept_graphs_are_adopted_by_the_next_loop_only_while_the_weights_stay_put():
    m = _model("SparseStructureFlowModel", "cpu", dtype="float32")
    x, t, cond = torch.randn(2, 8, 4, 4, 4), torch.full((2,), 700.0), torch.randn(2, 3, 16)
    first = GraphedModel(m, keep=True)
    key = _fake_capture(first, x, t, cond, zero_cond_from=1)
    first.close()
    assert cuda_graphs.kept_graphs(m) == 1 and not first._entries
    entry = cuda_graphs._KEPT[m].entries[key]
    assert entry.keep == ()  # the first loop's inputs are not held

    later = GraphedModel(m, keep=True)
    assert later.reused == 1 and later._entries[key] is entry and later._pool == ("pool",)
    assert cuda_graphs.kept_graphs(m) == 0  # owned by one loop at a time
    later.close()
    assert cuda_graphs.kept_graphs(m) == 1

    assert GraphedModel(m, keep=True, enabled=False).reused == 0 and cuda_graphs.kept_graphs(m) == 0  # dropped
    again = GraphedModel(m, keep=True)
    _fake_capture(again, x, t, cond)
    again.close()
    p = next(m.parameters())
    p.data = p.data.clone()  # the weights now live elsewhere: the graph would read the old storage
    moved = GraphedModel(m, keep=True)
    assert moved.reused == 0 and not moved._entries and cuda_graphs.kept_graphs(m) == 0


def test_only_loops_whose_keys_name_no_object_keep_graphs_and_release_frees_them():
    m = _model("SparseStructureFlowModel", "cpu", dtype="float32")
    x, t, cond = torch.randn(1, 8, 4, 4, 4), torch.full((1,), 700.0), torch.randn(1, 3, 16)
    plain = GraphedModel(m)  # keep=False: nothing outlives the loop
    _fake_capture(plain, x, t, cond)
    plain.close()
    assert cuda_graphs.kept_graphs(m) == 0

    s = _model("SLatFlowModel", "cpu", dtype="float32", in_channels=16)
    xs = _sparse([5], 16, "cpu")
    sparse = GraphedModel(s, keep=True)
    key = _fake_capture(sparse, xs, t, cond)
    assert not cuda_graphs._reusable(key)  # its coordinates, by identity: never matches a later loop
    sparse.close()
    assert cuda_graphs.kept_graphs(s) == 0

    mixed = GraphedModel(m, keep=True)
    _fake_capture(mixed, x, t, cond)
    _fake_capture(mixed, x, t, cond, extra=object())  # one key naming an object: the shared pool is freed whole
    mixed.close()
    assert cuda_graphs.kept_graphs(m) == 0

    kept = GraphedModel(m, keep=True)
    _fake_capture(kept, x, t, cond)
    kept.close()
    assert cuda_graphs.release_graphs(m) and cuda_graphs.kept_graphs(m) == 0 and not cuda_graphs.release_graphs(m)

    assert not cuda_graphs.release_graphs(object()) and cuda_graphs.kept_graphs(object()) == 0  # not weakly referable
    fn = lambda x, t, cond: x  # noqa: E731 (a plain callable: its weights are unknown, so nothing is kept)
    loose = GraphedModel(fn, keep=True)
    _fake_capture(loose, x, t, cond)
    loose._weights = ()  # even with a (vacuous) fingerprint
    loose.close()
    assert cuda_graphs.kept_graphs(fn) == 0


def test_components_release_kept_graphs_when_they_move_or_drop_a_model():
    from trellis2.trellis2_core.pipeline.components import Components, keep_graphs

    def keep_one(model):
        g = GraphedModel(model, keep=True)
        _fake_capture(g, torch.randn(1, 8, 4, 4, 4), torch.full((1,), 700.0), torch.randn(1, 3, 16))
        g.close()
        assert cuda_graphs.kept_graphs(model) == 1

    for policy, stays in (("keep", True), ("offload", False), ("free", False)):
        comps = Components({"flow": lambda: _model("SparseStructureFlowModel", "cpu", dtype="float32")}, "cpu", policy=policy)
        assert keep_graphs(comps)  # no plan: the stage may keep them; the source releases them on its own moves
        with comps.use("flow") as flow:
            keep_one(flow)
        assert (cuda_graphs.kept_graphs(flow) == 1) is stays, policy
    keep_comps = Components({"flow": lambda: _model("SparseStructureFlowModel", "cpu", dtype="float32")}, "cpu")
    with keep_comps.use("flow") as flow:
        keep_one(flow)
    keep_comps.unload_all()
    assert cuda_graphs.kept_graphs(flow) == 0
    assert keep_graphs(object()) is False  # a source that does not say it releases them keeps nothing


@pytest.mark.cuda
def test_cuda_kept_graphs_replay_in_the_next_loop_and_are_recaptured_after_the_weights_move():
    m = _model("SparseStructureFlowModel", "cuda")
    g = torch.Generator(device="cuda").manual_seed(3)

    def loop(graphed):
        outs = []
        with torch.no_grad():
            for step in range(3):
                for b in (2, 1):
                    x = torch.randn(b, 8, 4, 4, 4, device="cuda", generator=g)
                    t = torch.full((b,), 900.0 - 100 * step, device="cuda")
                    cond = torch.randn(b, 3, 16, device="cuda", generator=g)
                    out = graphed(x, t, cond)
                    outs.append(torch.equal(out, m(x, t, cond)))
        return outs

    with GraphedModel(m, keep=True) as first:
        assert all(loop(first))
    assert first.captures == 2 and cuda_graphs.kept_graphs(m) == 2
    with GraphedModel(m, keep=True) as later:
        assert all(loop(later))  # bit for bit, from its first call
    assert later.reused == 2 and later.captures == 0 and later.replays == 6
    with torch.no_grad():
        for p in m.parameters():
            p.data = p.data * 1.25  # new values in new storage: a kept graph would compute with the old ones
    with GraphedModel(m, keep=True) as moved:
        assert all(loop(moved))
    assert moved.reused == 0 and moved.captures == 2
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    assert cuda_graphs.release_graphs(m)
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < reserved  # the graphs' pool went back to the device


@pytest.mark.cuda
def test_cuda_pipeline_keeps_the_structure_stage_graphs_between_generations(tmp_path):
    from trellis2.trellis2_core.pipeline import Trellis2Pipeline
    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    root = write_tiny_snapshot(tmp_path / "tiny")
    pipe = Trellis2Pipeline.from_pretrained(root, device="cuda", allow_download=False)
    rgba = np.zeros((96, 80, 4), np.uint8)
    rgba[20:70, 15:60] = (200, 60, 30, 255)
    image = Image.fromarray(rgba, "RGBA")
    fast = {"sparse_structure": {"steps": 10}, "shape_slat": {"steps": 4}, "tex_slat": {"steps": 4}}
    a = pipe.generate(image, seed=5, pipeline_type="512", sampler_overrides=fast)
    with pipe.components.use("sparse_structure_flow_model") as flow:
        kept = cuda_graphs.kept_graphs(flow)
    assert kept >= 1
    b = pipe.generate(image, seed=5, pipeline_type="512", sampler_overrides=fast)  # replays the kept graphs
    assert torch.equal(a.shape.latent.feats, b.shape.latent.feats)
    assert torch.equal(_feats(a.material.latent), _feats(b.material.latent))
    pipe.components.unload_all()
    assert cuda_graphs.kept_graphs(flow) == 0
