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
from trellis2.trellis2_core.nn import cuda_graphs
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
                xs = x.replace(torch.randn_like(x.feats))
                t = torch.full((len(lengths),), 900.0 - 300 * step, device="cuda")
                cond = torch.randn(len(lengths), 3, 16, device="cuda")
                out = graphed(xs, t, cond, concat_cond=shape)
                ref = m(xs, t, cond, concat_cond=shape)
                assert out.coords is xs.coords
                assert torch.equal(out.feats, ref.feats), (lengths, step)
    assert graphed.captures == 2 and graphed.replays == 4 and graphed.failed_captures == 0
    # other coordinates of the same size are another key: eager first
    y = _sparse([19, 12], 8, "cuda", seed=9)
    ys = SparseTensor(torch.randn_like(y.feats), y.coords)
    with torch.no_grad():
        out = graphed(y, t, cond, concat_cond=ys)
        assert torch.equal(out.feats, m(y, t, cond, concat_cond=ys).feats)
    assert graphed.captures == 2


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
def test_cuda_batch_sizes_with_few_expected_calls_stay_eager():
    m = _model("SparseStructureFlowModel", "cuda")
    graphed = GraphedModel(m, expected_calls={1: 2, 2: 9})
    assert cuda_graphs.MIN_CALLS > 2
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


def _failed_capture_checks(caplog):
    m = _Syncing()
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
