"""Chunked decoder up blocks (``models/decoder_chunking.py``): conv1 a slice of parents at a time, straight into
the children, and the skip added in place, give the plain block's result; children in any row order."""

from __future__ import annotations

import pytest
import torch

from trellis2.trellis2_core.models.decoder_chunking import chunk_decoder
from trellis2.trellis2_core.models.sparse_unet_vae import SparseResBlockC2S3d
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse.spatial import Subdivision, subdivision_from_mask


def _block_and_input(c: int = 16, co: int = 8, n: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    block = SparseResBlockC2S3d(c, co, pred_subdiv=False).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(6**3, generator=g)[:n].sort().values
    coords = torch.stack([torch.zeros_like(cells), cells // 36, cells // 6 % 6, cells % 6], 1).int()
    x = SparseTensor(torch.randn(n, c, generator=g), coords)
    mask = torch.rand(n, 8, generator=g) < 0.45
    return block, x, mask


def _up(block, x, sub, rows):
    chunk_decoder(block, rows)
    try:
        with torch.no_grad():
            return block.up(x.replace(x.feats.clone()), sub).feats  # a fresh x: no neighbour map carried over
    finally:
        chunk_decoder(block, None)


@pytest.mark.parametrize("rows", [1, 8, 24, 10_000])
def test_chunked_up_block_equals_the_plain_one(rows):
    block, x, mask = _block_and_input()
    sub = subdivision_from_mask(x, mask)
    plain = _up(block, x, sub, None)
    chunked = _up(block, x, subdivision_from_mask(x, mask), rows)
    assert chunked.shape == plain.shape == (int(mask.sum()), 8)
    # conv rows are independent; the CPU reference's GEMM over fewer rows may round differently (~1e-7)
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)


def test_chunked_up_block_takes_children_in_any_order():
    """An encoder's record lists the children in the fine level's own order, not grouped by parent."""
    block, x, mask = _block_and_input(seed=3)
    sub = subdivision_from_mask(x, mask)
    perm = torch.randperm(sub.parent.shape[0], generator=torch.Generator().manual_seed(1))
    shuffled = Subdivision(sub.fine_coords[perm], sub.parent[perm], sub.child[perm], {})
    assert not bool((shuffled.parent[1:] >= shuffled.parent[:-1]).all())
    plain = _up(block, x, sub, None)
    chunked = _up(block, x, shuffled, 8)
    assert torch.allclose(chunked, plain[perm], rtol=1e-5, atol=1e-6)


def test_chunking_switches_the_up_block_and_back():
    block, _, _ = _block_and_input()
    assert chunk_decoder(block, 16) == 1 and {"up", "conv2_input"} <= set(block.__dict__)
    chunk_decoder(block, None)
    assert not {"up", "conv2_input"} & set(block.__dict__)
