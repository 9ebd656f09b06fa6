"""DiT block streaming (``nn/streaming.py``): the blocks' weights wait in pinned CPU memory and visit the device one
(+ prefetch) at a time, with results equal to the resident model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import TINY_DIT, random_model, tiny_slat_inputs
from trellis2.trellis2_core.nn.streaming import stream_blocks, streamer_of, unstream


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_streaming_is_bit_identical_on_cpu(prefetch):
    m = random_model("SLatFlowModel", TINY_DIT)
    x, t, cond = tiny_slat_inputs()
    dense, dt, dcond = torch.randn(2, 8, 4, 4, 4), torch.tensor([900.0, 10.0]), torch.randn(2, 3, 16)
    ss = random_model("SparseStructureFlowModel", TINY_DIT, seed=2)
    with torch.no_grad():
        ref, ref_ss = m(x, t, cond).feats, ss(dense, dt, dcond)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        streamer = stream_blocks(m, "cpu", prefetch=prefetch)
        stream_blocks(ss, "cpu", prefetch=prefetch)
        assert torch.equal(m(x, t, cond).feats, ref) and torch.equal(ss(dense, dt, dcond), ref_ss)
        assert torch.equal(m(x, t, cond).feats, ref)  # a second forward (sampler steps) too
    assert streamer.loads == 2 * 3 and streamer_of(m) is streamer
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert unstream(m) and streamer_of(m) is None and not unstream(m)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in m.blocks)


class _Toy(nn.Module):
    """A small 'DiT': top-level layer, buffer, blocks of Linear + LayerNorm; records what its blocks run with."""

    def __init__(self):
        super().__init__()
        self.input_layer = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(3))
        self.register_buffer("scale", torch.ones(8))
        self.seen: list[int] = []
        for b in self.blocks:  # inside the block's call, after its streaming pre-hook
            b[0].register_forward_pre_hook(lambda mod, args: self.seen.append(mod.weight.data_ptr()))

    def forward(self, x):
        h = self.input_layer(x)
        for b in self.blocks:
            h = b(h) * self.scale
        return h


def test_streaming_moves_each_block_in_and_out():
    # CPU holder, CPU device: the hooks still copy, so inside its forward a block runs on fresh tensors and
    # outside it its parameters are the (same) held CPU tensors again; top-level layers never move.
    m = _Toy()
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = m(x)
        held = [b[0].weight.data_ptr() for b in m.blocks]
        top = m.input_layer.weight.data_ptr()
        m.seen.clear()
        stream_blocks(m, "cpu", prefetch=1)
        assert [b[0].weight.data_ptr() for b in m.blocks] == held and m.input_layer.weight.data_ptr() == top
        assert torch.equal(m(x), ref)
    assert len(m.seen) == 3 and not set(m.seen) & set(held)  # ran on copies
    assert [b[0].weight.data_ptr() for b in m.blocks] == held  # released again
    # A forward that fails midway leaves its copies installed until release() (Components calls it).
    m.blocks[1][1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        m(x)
    assert m.blocks[1][0].weight.data_ptr() != held[1] and streamer_of(m)._pending  # block 2 prefetched
    streamer_of(m).release()
    assert not streamer_of(m)._pending
    assert [b[0].weight.data_ptr() for b in m.blocks] == held


def test_streaming_argument_errors():
    with pytest.raises(TypeError, match="ModuleList"):
        stream_blocks(nn.Linear(2, 2), "cpu")
    with pytest.raises(ValueError, match="prefetch"):
        stream_blocks(_Toy(), "cpu", prefetch=-1)


@pytest.mark.cuda
def test_streaming_on_cuda_equals_resident():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = random_model("SLatFlowModel", TINY_DIT)
    x, t, cond = tiny_slat_inputs()
    with torch.no_grad():
        resident = m.to("cuda")(x.to("cuda"), t, cond.cuda()).feats
        m.to("cpu")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        streamer = stream_blocks(m, "cuda", prefetch=1)
        assert all(p.is_pinned() for p in m.blocks.parameters())
        streamed = m(x.to("cuda"), t, cond.cuda()).feats
        torch.cuda.synchronize()
    assert torch.equal(streamed, resident) and streamer.loads == 3
    assert all(p.device.type == "cpu" for p in m.blocks.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in m.blocks.parameters())
    assert torch.cuda.memory_allocated() - base < block_bytes  # blocks left the GPU again
