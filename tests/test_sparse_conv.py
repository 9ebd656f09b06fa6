"""Submanifold 3x3x3 sparse conv: golden, dense-conv equivalence, neighbour map, chunking, module and cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rel
from trellis2.kernels.sparse_conv import build_neighbours, submanifold_conv3d
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse.conv import NEIGHBOUR_CACHE_KEY, SparseConv3d


def random_coords(n: int, grid: tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """[<=n, 4] int32 unique voxels, grouped by batch in increasing order, shuffled inside each item."""
    g = torch.Generator().manual_seed(seed)
    c = torch.stack(
        [torch.randint(0, batch, (n,), generator=g)] + [torch.randint(0, s, (n,), generator=g) for s in grid], dim=1
    )
    c = torch.unique(c, dim=0)
    c = c[torch.randperm(len(c), generator=g)]
    return c[torch.argsort(c[:, 0], stable=True)].int()


def dense_conv(feats, coords, weight, bias):
    """Scatter into a zero grid, F.conv3d (cross-correlation, padding 1), gather at the active voxels."""
    b, x, y, z = coords.long().unbind(1)
    grid = torch.zeros(int(b.max()) + 1, feats.shape[1], int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1, dtype=feats.dtype)
    grid[b, :, x, y, z] = feats
    out = F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), bias, padding=1)
    return out[b, :, x, y, z]


def test_golden_submanifold_conv3d(golden):
    g = golden("sparse_submanifold_conv3d")
    coords, feats = g.inputs["coords"], g.inputs["feats"]
    out = submanifold_conv3d(feats, build_neighbours(coords), g.weights["weight"], g.weights["bias"])
    assert_close_rel(out, g.outputs["out"], what="reference op")
    conv = SparseConv3d(feats.shape[1], g.weights["weight"].shape[0], device="meta")
    conv.load_state_dict(g.weights, strict=True, assign=True)
    assert_close_rel(conv(SparseTensor(feats, coords)).feats, g.outputs["out"], what="SparseConv3d module")


@pytest.mark.parametrize("ci,co,bias", [(5, 7, True), (16, 3, False), (1, 1, True)])
def test_matches_dense_conv3d(ci, co, bias):
    coords = random_coords(300, (7, 6, 5), batch=2, seed=ci)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(coords), ci, generator=g, dtype=torch.float64)
    weight = torch.randn(co, 3, 3, 3, ci, generator=g, dtype=torch.float64)
    b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
    out = submanifold_conv3d(feats, build_neighbours(coords), weight, b)
    assert_close_rel(out, dense_conv(feats, coords, weight, b), rtol=1e-12)


def brute_neighbours(coords: torch.Tensor) -> torch.Tensor:
    row = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = torch.full((len(coords), 27), -1, dtype=torch.int64)
    for n, (b, x, y, z) in enumerate(coords.tolist()):
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    out[n, i * 9 + j * 3 + k] = row.get((b, x + i - 1, y + j - 1, z + k - 1), -1)
    return out


def test_build_neighbours_exact_and_never_crosses_batch():
    coords = random_coords(200, (4, 5, 3), batch=3, seed=5)
    nbr = build_neighbours(coords)
    assert nbr.dtype == torch.int32 and nbr.shape == (len(coords), 27)  # 108 bytes per voxel
    assert torch.equal(nbr, brute_neighbours(coords))
    assert torch.equal(nbr[:, 13], torch.arange(len(coords)))


def test_neighbour_column_order_is_x_major():
    # voxel 0 at (0, 2, 2, 2); its only neighbour sits at +x -> kernel index (2, 1, 1) -> column 2*9 + 1*3 + 1 = 22
    coords = torch.tensor([[0, 2, 2, 2], [0, 3, 2, 2], [1, 2, 2, 3]], dtype=torch.int32)
    nbr = build_neighbours(coords)
    assert nbr[0].tolist() == [-1] * 13 + [0] + [-1] * 8 + [1] + [-1] * 4
    assert nbr[1, 4] == 0  # voxel 1 sees voxel 0 at -x: kernel index (0, 1, 1) -> column 4
    assert (nbr[2] >= 0).sum() == 1  # (1, 2, 2, 3) is in another batch item: only itself


def test_empty_and_single_voxel():
    w = torch.randn(4, 3, 3, 3, 2)
    bias = torch.randn(4)
    empty = torch.empty(0, 4, dtype=torch.int32)
    assert build_neighbours(empty).shape == (0, 27)
    out = submanifold_conv3d(torch.empty(0, 2), build_neighbours(empty), w, bias)
    assert out.shape == (0, 4)
    one = torch.tensor([[0, 5, 0, 9]], dtype=torch.int32)
    f = torch.randn(1, 2)
    out = submanifold_conv3d(f, build_neighbours(one), w, bias)
    assert torch.allclose(out, f @ w[:, 1, 1, 1, :].t() + bias, atol=1e-6)


def test_chunked_equals_unchunked():
    coords = random_coords(500, (8, 8, 8), batch=1, seed=3)
    feats = torch.randn(len(coords), 6)
    w, b = torch.randn(5, 3, 3, 3, 6), torch.randn(5)
    nbr = build_neighbours(coords)
    full = submanifold_conv3d(feats, nbr, w, b, chunk_rows=len(coords))
    for rows in (1, 7, 64):
        assert_close_rel(submanifold_conv3d(feats, nbr, w, b, chunk_rows=rows), full, rtol=1e-6, what=f"chunk {rows}")
    tiny_budget = submanifold_conv3d(feats, nbr, w, b, max_bytes=27 * 6 * 4 * 13)  # 13 rows per chunk
    assert_close_rel(tiny_budget, full, rtol=1e-6)


def test_half_inputs_accumulate_in_fp32():
    coords = random_coords(300, (6, 6, 6), batch=1, seed=4)
    feats, w = torch.randn(len(coords), 32), torch.randn(8, 3, 3, 3, 32) * 0.1
    nbr = build_neighbours(coords)
    ref = submanifold_conv3d(feats.double(), nbr, w.double())
    for dt in (torch.float16, torch.bfloat16):
        out = submanifold_conv3d(feats.to(dt), nbr, w.to(dt))
        assert out.dtype == dt
        # only input/output rounding: bf16 has 8 mantissa bits, fp16 11
        assert_close_rel(out, ref, rtol=2e-2 if dt == torch.bfloat16 else 3e-3, what=str(dt))


def test_bad_arguments_raise_named_errors():
    coords = random_coords(20, (3, 3, 3), batch=1)
    nbr = build_neighbours(coords)
    with pytest.raises(ValueError, match="weight must be"):
        submanifold_conv3d(torch.randn(len(coords), 4), nbr, torch.randn(2, 3, 3, 3, 5))
    with pytest.raises(ValueError, match="neighbours must be"):
        submanifold_conv3d(torch.randn(len(coords), 4), nbr[:, :26], torch.randn(2, 3, 3, 3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        build_neighbours(torch.tensor([[0, -1, 0, 0]], dtype=torch.int32))


def test_rows_of_the_map_compute_those_output_rows():
    """A slice of a level's neighbour map computes only those output rows, from all of the level's features (how
    a decoder chunks a convolution's output)."""
    coords = random_coords(300, (7, 7, 7), batch=2)
    nbr = build_neighbours(coords)
    g = torch.Generator().manual_seed(3)
    feats, w, b = torch.randn(len(coords), 5, generator=g), torch.randn(6, 3, 3, 3, 5, generator=g), torch.randn(6, generator=g)
    whole = submanifold_conv3d(feats, nbr, w, b)
    n = len(coords)
    for r0, r1 in ((0, 1), (17, n // 2), (n - 60, n), (5, 5)):
        part = submanifold_conv3d(feats, nbr[r0:r1], w, b)
        assert part.shape == (r1 - r0, 6)
        assert torch.allclose(part, whole[r0:r1], rtol=1e-6, atol=1e-6)


def test_module_meta_cache_and_dtype():
    conv = SparseConv3d(3, 4, device="meta")
    assert conv.weight.shape == (4, 3, 3, 3, 3) and conv.weight.device.type == "meta"
    torch.manual_seed(0)
    a, b = SparseConv3d(3, 4), SparseConv3d(4, 2, bias=False)
    assert b.bias is None and sorted(a.state_dict()) == ["bias", "weight"]
    coords = random_coords(100, (5, 5, 5), batch=1)
    x = SparseTensor(torch.randn(len(coords), 3, dtype=torch.float64), coords)
    h = a(x)  # float64 input, float32 weights -> computed and returned in the weight dtype
    assert h.dtype == torch.float32 and h.coords is x.coords
    nbr = x.get_cache(NEIGHBOUR_CACHE_KEY)
    assert nbr is not None and h.get_cache(NEIGHBOUR_CACHE_KEY) is nbr
    out = b(h)
    assert out.get_cache(NEIGHBOUR_CACHE_KEY) is nbr  # one map per level, shared by all convs there
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        a(h)
