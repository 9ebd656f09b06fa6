"""CUDA graphs kept between sampling loops (trellis2_core/nn/kept_graphs.py, GraphedModel(keep=True)).

CPU: the bookkeeping (adopted by the next loop only while the weights stay put; loops whose keys name objects keep
nothing; release; the engine's Components release on offload/free/unload). CUDA: the next loop replays bit for bit
from its first call, moved weights are captured again with their new values, release returns the memory, and a
pipeline keeps its structure stage's graphs between generations.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_GRAPH_DIT, block_image, random_model, random_sparse
from trellis2.trellis2_core.nn import kept_graphs
from trellis2.trellis2_core.nn.cuda_graphs import GraphedModel, _Entry
from trellis2.trellis2_core.sparse import SparseTensor


def _model(name: str, device: str, **args) -> torch.nn.Module:
    return random_model(name, TINY_GRAPH_DIT, device=device, **args)


def _feats(v):
    return v.feats if isinstance(v, SparseTensor) else v


def _fake_capture(graphed: GraphedModel, *args, **kwargs) -> tuple:
    """Book a captured entry for this call as _capture would (no GPU: the bookkeeping of keeping is what's tested)."""
    key = graphed.key(*args, **kwargs)
    graphed._entries[key] = _Entry(args + tuple(kwargs.values()))
    graphed._pool = graphed._pool or ("pool",)
    graphed._weights = graphed._weights or kept_graphs.fingerprint(graphed.model)  # None for a plain callable
    return key


def test_kept_graphs_are_adopted_by_the_next_loop_only_while_the_weights_stay_put():
    m = _model("SparseStructureFlowModel", "cpu", dtype="float32")
    x, t, cond = torch.randn(2, 8, 4, 4, 4), torch.full((2,), 700.0), torch.randn(2, 3, 16)
    first = GraphedModel(m, keep=True)
    key = _fake_capture(first, x, t, cond, zero_cond_from=1)
    first.close()
    assert kept_graphs.kept_graphs(m) == 1 and not first._entries
    entry = kept_graphs._KEPT[m].entries[key]
    assert entry.keep == ()  # the first loop's inputs are not held

    later = GraphedModel(m, keep=True)
    assert later.reused == 1 and later._entries[key] is entry and later._pool == ("pool",)
    assert kept_graphs.kept_graphs(m) == 0  # owned by one loop at a time
    later.close()
    assert kept_graphs.kept_graphs(m) == 1

    assert GraphedModel(m, keep=True, enabled=False).reused == 0 and kept_graphs.kept_graphs(m) == 0  # dropped
    again = GraphedModel(m, keep=True)
    _fake_capture(again, x, t, cond)
    again.close()
    p = next(m.parameters())
    p.data = p.data.clone()  # the weights now live elsewhere: the graph would read the old storage
    moved = GraphedModel(m, keep=True)
    assert moved.reused == 0 and not moved._entries and kept_graphs.kept_graphs(m) == 0


def test_only_loops_whose_keys_name_no_object_keep_graphs_and_release_frees_them():
    m = _model("SparseStructureFlowModel", "cpu", dtype="float32")
    x, t, cond = torch.randn(1, 8, 4, 4, 4), torch.full((1,), 700.0), torch.randn(1, 3, 16)
    plain = GraphedModel(m)  # keep=False: nothing outlives the loop
    _fake_capture(plain, x, t, cond)
    plain.close()
    assert kept_graphs.kept_graphs(m) == 0

    s = _model("SLatFlowModel", "cpu", dtype="float32", in_channels=16)
    xs = random_sparse([5], 16, res=12)
    sparse = GraphedModel(s, keep=True)
    key = _fake_capture(sparse, xs, t, cond)
    assert not kept_graphs.reusable(key)  # its coordinates, by identity: never matches a later loop
    sparse.close()
    assert kept_graphs.kept_graphs(s) == 0

    mixed = GraphedModel(m, keep=True)
    _fake_capture(mixed, x, t, cond)
    _fake_capture(mixed, x, t, cond, extra=object())  # one key naming an object: the shared pool is freed whole
    mixed.close()
    assert kept_graphs.kept_graphs(m) == 0

    kept = GraphedModel(m, keep=True)
    _fake_capture(kept, x, t, cond)
    kept.close()
    assert kept_graphs.release_graphs(m) and kept_graphs.kept_graphs(m) == 0 and not kept_graphs.release_graphs(m)

    assert not kept_graphs.release_graphs(object()) and kept_graphs.kept_graphs(object()) == 0  # not weakly referable
    fn = lambda x, t, cond: x  # noqa: E731 (a plain callable: its weights are unknown, so nothing is kept)
    loose = GraphedModel(fn, keep=True)
    _fake_capture(loose, x, t, cond)
    loose._weights = ()  # even with a (vacuous) fingerprint
    loose.close()
    assert kept_graphs.kept_graphs(fn) == 0


def test_components_release_kept_graphs_when_they_move_or_drop_a_model():
    from trellis2.trellis2_core.pipeline.components import Components, keep_graphs

    def keep_one(model):
        g = GraphedModel(model, keep=True)
        _fake_capture(g, torch.randn(1, 8, 4, 4, 4), torch.full((1,), 700.0), torch.randn(1, 3, 16))
        g.close()
        assert kept_graphs.kept_graphs(model) == 1

    for policy, stays in (("keep", True), ("offload", False), ("free", False)):
        comps = Components({"flow": lambda: _model("SparseStructureFlowModel", "cpu", dtype="float32")}, "cpu", policy=policy)
        assert keep_graphs(comps)  # no plan: the stage may keep them; the source releases them on its own moves
        with comps.use("flow") as flow:
            keep_one(flow)
        assert (kept_graphs.kept_graphs(flow) == 1) is stays, policy
    keep_comps = Components({"flow": lambda: _model("SparseStructureFlowModel", "cpu", dtype="float32")}, "cpu")
    with keep_comps.use("flow") as flow:
        keep_one(flow)
    keep_comps.unload_all()
    assert kept_graphs.kept_graphs(flow) == 0
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
    assert first.captures == 2 and kept_graphs.kept_graphs(m) == 2
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
    assert kept_graphs.release_graphs(m)
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < reserved  # the graphs' pool went back to the device


@pytest.mark.cuda
def test_cuda_pipeline_keeps_the_structure_stage_graphs_between_generations(tmp_path):
    from trellis2.trellis2_core.pipeline import Trellis2Pipeline
    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    root = write_tiny_snapshot(tmp_path / "tiny")
    pipe = Trellis2Pipeline.from_pretrained(root, device="cuda", allow_download=False)
    image = block_image()
    fast = {"sparse_structure": {"steps": 10}, "shape_slat": {"steps": 4}, "tex_slat": {"steps": 4}}
    a = pipe.generate(image, seed=5, pipeline_type="512", sampler_overrides=fast)
    with pipe.components.use("sparse_structure_flow_model") as flow:
        kept = kept_graphs.kept_graphs(flow)
    assert kept >= 1
    b = pipe.generate(image, seed=5, pipeline_type="512", sampler_overrides=fast)  # replays the kept graphs
    assert torch.equal(a.shape.latent.feats, b.shape.latent.feats)
    assert torch.equal(_feats(a.material.latent), _feats(b.material.latent))
    pipe.components.unload_all()
    assert kept_graphs.kept_graphs(flow) == 0
