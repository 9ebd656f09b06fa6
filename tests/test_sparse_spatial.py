"""Spatial2Channel / Channel2Spatial (factor 2): ordering, channel blocks, masks, exact round trips."""

from __future__ import annotations

import pytest
import torch

from test_sparse_conv import random_coords
from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse.spatial import (
    Channel2Spatial,
    Spatial2Channel,
    spatial2channel,
    subdivision_from_mask,
)


def child_index(c):
    return (c[1] & 1) | ((c[2] & 1) << 1) | ((c[3] & 1) << 2)


def test_s2c_parents_sorted_unique_and_channel_blocks():
    coords = random_coords(150, (8, 6, 7), batch=2, seed=1)
    feats = torch.randn(len(coords), 3)
    out = Spatial2Channel()(SparseTensor(feats, coords))
    # brute force: parent -> {child: feats}
    expect: dict[tuple, dict[int, torch.Tensor]] = {}
    for c, f in zip(coords.tolist(), feats):
        expect.setdefault((c[0], c[1] // 2, c[2] // 2, c[3] // 2), {})[child_index(c)] = f
    parents = sorted(expect)
    assert out.coords.dtype == torch.int32 and out.coords.tolist() == [list(p) for p in parents]
    assert out.feats.shape == (len(parents), 24)
    for row, p in enumerate(parents):
        blocks = out.feats[row].reshape(8, 3)
        for s in range(8):
            want = expect[p].get(s, torch.zeros(3))
            assert torch.equal(blocks[s], want), (p, s)


def test_c2s_mask_order_coords_and_feats():
    coords = torch.tensor([[0, 1, 0, 2], [0, 0, 3, 1], [1, 2, 2, 2]], dtype=torch.int32)
    feats = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16)  # 8 blocks of 2 channels
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, [6, 1]] = True  # child 1 = +x, child 6 = +y+z
    mask[2, [0, 7]] = True  # parent 1 has no children
    out = Channel2Spatial()(SparseTensor(feats, coords), mask)
    assert out.coords.tolist() == [[0, 3, 0, 4], [0, 2, 1, 5], [1, 4, 4, 4], [1, 5, 5, 5]]
    assert out.feats.tolist() == [feats[0, 2:4].tolist(), feats[0, 12:14].tolist(), feats[2, 0:2].tolist(), feats[2, 14:16].tolist()]


def test_c2s_with_occupancy_mask_inverts_s2c_as_a_set():
    coords = random_coords(120, (6, 6, 6), batch=2, seed=2)
    feats = torch.randn(len(coords), 4)
    fine = SparseTensor(feats, coords)
    coarse = spatial2channel(fine)
    occupied = coarse.feats.reshape(len(coarse), 8, 4).abs().sum(-1) > 0
    back = Channel2Spatial()(coarse, occupied)
    # mask path emits parent-major child-ascending order, so compare as sorted sets
    key = lambda c: (((c[:, 0].long() * 64 + c[:, 1]) * 64 + c[:, 2]) * 64 + c[:, 3])
    o_a, o_b = torch.argsort(key(back.coords)), torch.argsort(key(coords))
    assert torch.equal(back.coords[o_a], coords[o_b])
    assert torch.equal(back.feats[o_a], feats[o_b])


def test_record_round_trip_two_levels_restores_row_order():
    coords = random_coords(300, (16, 13, 11), batch=2, seed=7)
    feats = torch.randn(len(coords), 2)
    x0 = SparseTensor(feats, coords)
    x1 = spatial2channel(x0)  # [N1, 16]
    x2 = spatial2channel(x1.replace(x1.feats * 1.0))  # replace keeps the record chain
    assert x2.feats.shape[1] == 128
    c2s = Channel2Spatial()
    y1 = c2s(x2.replace(x2.feats))  # no mask: invert using the record
    assert torch.equal(y1.coords, x1.coords) and torch.equal(y1.feats, x1.feats)
    y0 = c2s(y1)
    assert torch.equal(y0.coords, coords) and torch.equal(y0.feats, feats)
    with pytest.raises(InputError, match="no spatial2channel record"):
        c2s(y0)


def test_s2c_tables_are_shared_by_same_level_calls():
    coords = random_coords(50, (5, 5, 5), batch=1, seed=3)
    x = SparseTensor(torch.randn(len(coords), 3), coords)
    a, b = spatial2channel(x), spatial2channel(x.replace(torch.randn(len(coords), 5)))
    assert a.coords is b.coords  # one plan per level; both outputs share the coarse cache
    a.set_cache("probe", 1)
    assert b.get_cache("probe") == 1


def test_empty_input_and_bad_masks():
    empty = SparseTensor(torch.empty(0, 3), torch.empty(0, 4, dtype=torch.int32))
    out = spatial2channel(empty)
    assert out.feats.shape == (0, 24) and out.coords.shape == (0, 4)
    assert len(Channel2Spatial()(out)) == 0
    x = SparseTensor(torch.randn(2, 16), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    with pytest.raises(InputError, match=r"bool \[2, 8\]"):
        subdivision_from_mask(x, torch.ones(2, 8))
    with pytest.raises(InputError, match="no subdivision mask"):
        Channel2Spatial()(x)
    with pytest.raises(InputError, match="non-negative"):
        spatial2channel(SparseTensor(torch.randn(1, 2), torch.tensor([[0, -2, 0, 0]], dtype=torch.int32)))
