"""Neighbour maps derived from the parent level, and the Triton kernel's row-tile plan: exactness (CPU), the
planned kernel against the reference (Triton's CPU interpreter; CUDA), and when the decoders use them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trellis2.kernels import sparse_conv as spconv
from trellis2.kernels.sparse_conv import build_neighbours, build_tile_plan, neighbours_from_parent, reference
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse import conv as sconv
from trellis2.trellis2_core.sparse.spatial import (
    channel2spatial,
    spatial2channel,
    spatial2channel_plan,
    subdivision_from_mask,
    subdivision_from_record,
)

from test_kernels_sparse_conv import TOLERANCES, shell_coords


def _parents(n: int, seed: int, batches: int = 3, side: int = 12) -> torch.Tensor:
    """Unique voxels in ``batches`` items, in shuffled row order (no reliance on sorted parents)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.randint(0, batches, (n, 1), generator=g), torch.randint(0, side, (n, 3), generator=g)], 1)
    c = torch.unique(c, dim=0)
    return c[torch.randperm(len(c), generator=g)].int()


# ------------------------------------------------------------------------------------------------ derived maps
@pytest.mark.parametrize("seed", range(4))
def test_neighbours_from_parent_equal_a_fresh_build(seed):
    coords = _parents(700, seed)
    x = SparseTensor(torch.zeros(len(coords), 1), coords)
    mask = torch.rand(len(coords), 8, generator=torch.Generator().manual_seed(seed)) < 0.3 + 0.15 * seed
    sub = subdivision_from_mask(x, mask)
    for chunk in (1 << 18, 97, 1):
        got = neighbours_from_parent(build_neighbours(coords), sub.parent, sub.child, chunk_rows=chunk)
        assert got.dtype == torch.int32 and torch.equal(got, build_neighbours(sub.fine_coords)), f"chunk {chunk}"
    wide = neighbours_from_parent(build_neighbours(coords).long(), sub.parent, sub.child)  # an int64 map works too
    assert torch.equal(wide, got)


def test_neighbours_from_parent_in_an_encoders_row_order():
    """The texturing path subdivides by the encoder's record: fine rows in the input's original (any) order."""
    fine = _parents(900, seed=5, batches=2, side=16)
    coarse = spatial2channel(SparseTensor(torch.zeros(len(fine), 1), fine))
    sub = subdivision_from_record(coarse)
    got = neighbours_from_parent(build_neighbours(coarse.coords), sub.parent, sub.child)
    assert torch.equal(got, build_neighbours(fine))


def test_neighbours_from_parent_edge_cases():
    empty = torch.empty(0, dtype=torch.int64)
    assert neighbours_from_parent(torch.empty(0, 27, dtype=torch.int64), empty, empty).shape == (0, 27)
    one = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    sub = subdivision_from_mask(SparseTensor(torch.zeros(1, 1), one), torch.ones(1, 8, dtype=torch.bool))
    got = neighbours_from_parent(build_neighbours(one), sub.parent, sub.child)
    assert torch.equal(got, build_neighbours(sub.fine_coords))
    assert ((got >= 0).sum(1) == 8).all()  # each child of a full 2x2x2 block sees the block's 8 voxels
    with pytest.raises(ValueError, match="parent map"):
        neighbours_from_parent(torch.zeros(3, 26, dtype=torch.int64), empty, empty)


def test_channel2spatial_leaves_the_link_and_the_conv_uses_it(monkeypatch):
    """Parent level with a map -> the children's first conv derives theirs (no search), drops the link, and the
    skip branch (same Subdivision) shares it."""
    coords = _parents(400, seed=9)
    x = SparseTensor(torch.randn(len(coords), 16), coords)
    conv = sconv.SparseConv3d(16, 16)
    h = conv(x)  # builds the parent map
    builds = []
    monkeypatch.setattr(sconv._reference, "build_neighbours", lambda c: builds.append(len(c)) or build_neighbours(c))
    sub = subdivision_from_mask(x, torch.rand(len(coords), 8, generator=torch.Generator().manual_seed(1)) < 0.5)
    fine = channel2spatial(h.replace(torch.randn(len(coords), 16)), sub)
    skip = channel2spatial(x.replace(torch.randn(len(coords), 16)), sub)
    assert fine.get_cache(sconv.PARENT_NEIGHBOURS_KEY) is not None
    sconv.SparseConv3d(2, 3)(fine.replace(torch.randn(len(fine), 2)))
    assert builds == []
    assert fine.get_cache(sconv.PARENT_NEIGHBOURS_KEY) is None  # the parent's map is not kept alive by the child
    assert skip.get_cache(sconv.NEIGHBOUR_CACHE_KEY) is fine.get_cache(sconv.NEIGHBOUR_CACHE_KEY)
    assert torch.equal(sconv.neighbour_map(fine), build_neighbours(sub.fine_coords))
    # without a parent map the child searches as before
    bare = channel2spatial(SparseTensor(torch.randn(len(coords), 16), coords), sub_without_map(coords))
    sconv.neighbour_map(bare)
    assert builds == [len(bare)]


def sub_without_map(coords):
    return subdivision_from_mask(SparseTensor(torch.zeros(len(coords), 1), coords), torch.ones(len(coords), 8, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ tile plan
@pytest.mark.parametrize("block_m,window", [(128, 4096), (16, 0), (7, 50), (1, 1)])
def test_tile_plan_is_a_permutation_covering_every_needed_offset(block_m, window):
    coords = shell_coords(3000, seed=2)
    nbr = build_neighbours(coords)
    plan = build_tile_plan(nbr, block_m=block_m, window=window)
    n = len(coords)
    assert torch.equal(torch.sort(plan.rows.long()).values, torch.arange(n))
    assert plan.nbr.dtype == torch.int32 and torch.equal(plan.nbr, nbr[plan.rows.long()])
    tiles = -(-n // block_m)
    assert plan.taps.shape == (tiles, 27) and plan.counts.shape == (tiles,)
    assert (torch.sort(plan.taps.long(), 1).values == torch.arange(27)).all()  # every offset once per tile
    for t in range(tiles):
        rows = plan.nbr[t * block_m : (t + 1) * block_m]
        need = set(torch.nonzero((rows >= 0).any(0)).flatten().tolist())
        listed = plan.taps[t, : plan.counts[t]].tolist()
        assert set(listed) == need and listed == sorted(listed)
    if window > 0:  # sorting stays inside windows of consecutive rows
        assert torch.equal(plan.rows.long() // window, torch.arange(n) // window)
    assert 0.0 < plan.work_fraction <= 1.0


def test_tile_plan_skips_work_on_a_surface():
    """On a sphere shell sorted rows let tiles skip offsets; the decoder's own order would skip almost none."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import _models as M  # the benchmark's sphere shells

    nbr = build_neighbours(M.shell_coords(128, 0.4, 0.0, "cpu"))
    planned = build_tile_plan(nbr).work_fraction
    as_is = build_tile_plan(nbr, window=1).work_fraction  # window 1: no reordering
    assert as_is > 0.99 and planned < 0.9


def test_tile_plan_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 27\]"):
        build_tile_plan(torch.zeros(4, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="block_m"):
        build_tile_plan(torch.zeros(4, 27, dtype=torch.int64), block_m=0)


def test_wants_plan_only_where_triton_runs_and_it_pays(monkeypatch):
    f = torch.zeros(10, 128)
    assert not spconv.wants_plan(f, 128, 128)  # CPU: the reference, no plan
    monkeypatch.setattr(spconv, "resolve_backend", lambda device, backend=None: "triton")
    assert spconv.wants_plan(f, 128, 128) and spconv.wants_plan(f, 256, 1024)
    assert not spconv.wants_plan(f, 512, 512)  # wide inputs: the plain kernel is as fast
    assert not spconv.wants_plan(f, 64, 64)  # the decoder's last level: the plan does not repay its build
    assert not spconv.wants_plan(f[:0], 128, 128)


def test_plan_for_other_rows_is_refused(monkeypatch):
    f, w = torch.zeros(5, 4), torch.zeros(2, 3, 3, 3, 4)
    nbr = build_neighbours(shell_coords(5, seed=1))
    monkeypatch.setattr(spconv, "resolve_backend", lambda device, backend=None: "triton")
    monkeypatch.setattr(spconv, "_triton_module", lambda required: object())
    with pytest.raises(ValueError, match="plan is for"):
        spconv.submanifold_conv3d(f, nbr, w, plan=build_tile_plan(build_neighbours(shell_coords(6, seed=1))))


# ------------------------------------------------------------------------------------------------ planned kernel
_INTERP_SCRIPT = r"""
import sys, torch, triton
from trellis2.kernels.sparse_conv import triton as T, reference as R, build_tile_plan
from test_kernels_sparse_conv import shell_coords
T._subm_conv_tiled_kernel.configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=2)]
bad = []
for n, ci, co, bm, win, dt in [(230, 16, 32, 32, 64, torch.float32), (199, 24, 40, 16, 0, torch.float16),
                               (87, 8, 8, 64, 4096, torch.float16), (1, 5, 3, 16, 0, torch.float32)]:
    coords = shell_coords(n, seed=n)
    nbr = R.build_neighbours(coords)
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, ci, generator=g).to(dt)
    w = (torch.randn(co, 3, 3, 3, ci, generator=g) / (27 * ci) ** 0.5).to(dt)
    b = torch.randn(co, generator=g)
    ref = R.submanifold_conv3d(f.float(), nbr, w.float(), b)
    got = T.submanifold_conv3d(f, nbr, w, b, build_tile_plan(nbr, block_m=bm, window=win))
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dt]
    if got.dtype != dt or not err <= tol:
        bad.append(f"N={n} Ci={ci} Co={co} {dt}: err {err:.2e}")
print("checked")
if bad:
    sys.exit("\n".join(bad))
"""


def test_planned_kernel_in_interpreter_matches_reference():
    """The planned Triton kernel (every offset in plan order: the interpreter cannot loop to a loaded count) on CPU
    in Triton's interpreter against the reference: row permutation, gathers and scattered stores. fp32 and fp16
    only: the interpreter's tl.dot does not emulate bf16 (numpy has none); the CUDA tests cover bf16."""
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([here] + sys.path))  # this trellis2
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=900, cwd=here)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("n,ci,co", [(1, 8, 8), (97, 32, 96), (1000, 96, 128), (65537, 64, 64), (20000, 256, 1024)])
@pytest.mark.parametrize("block_m,window", [(128, 4096), (32, 0)])
def test_planned_triton_matches_reference(n, ci, co, dtype, block_m, window):
    torch.backends.cuda.matmul.allow_tf32 = False
    coords = shell_coords(n, seed=ci).cuda()
    g = torch.Generator(device="cuda").manual_seed(n)
    feats = torch.randn(n, ci, device="cuda", generator=g).to(dtype)
    w = (torch.randn(co, 3, 3, 3, ci, device="cuda", generator=g) / (27 * ci) ** 0.5).to(dtype)
    b = torch.randn(co, device="cuda", generator=g).to(dtype)
    nbr = build_neighbours(coords)
    expected = reference.submanifold_conv3d(feats.float(), nbr, w.float(), b.float())
    torch.full((n, co), float("nan"), dtype=dtype, device="cuda")  # poison the allocator's next block
    out = spconv.submanifold_conv3d(feats, nbr, w, b, backend="triton", plan=build_tile_plan(nbr, block_m, window))
    assert out.shape == (n, co) and out.dtype == dtype and torch.isfinite(out).all()
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= TOLERANCES[dtype], f"N={n} Ci={ci} Co={co} {dtype}: rel err {err:.2e}"


@pytest.mark.cuda
def test_module_uses_the_plan_on_cuda_and_matches_the_plain_kernel():
    coords = shell_coords(30000, seed=4).cuda()
    x = SparseTensor(torch.randn(len(coords), 128, device="cuda", dtype=torch.float16), coords)
    conv = sconv.SparseConv3d(128, 128, device="cuda", dtype=torch.float16)
    out = conv(x).feats
    assert x.get_cache(sconv.TILE_PLAN_KEY) is not None
    plain = spconv.submanifold_conv3d(x.feats, build_neighbours(coords), conv.weight, conv.bias, backend="triton")
    err = ((out.double() - plain.double()).norm() / plain.double().norm()).item()
    assert err <= 1e-3  # same sums in another order of offsets: fp32 accumulation, one fp16 rounding


@pytest.mark.cuda
def test_neighbours_from_parent_on_cuda_at_decoder_scale():
    """A surface level of ~230k voxels subdivided to ~0.9 M: the derived map equals the searched one on the GPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import _models as M

    coarse, parent, child = spatial2channel_plan(M.shell_coords(512, 0.4, 0.0, "cuda"))
    keep = torch.zeros(len(coarse) * 8, dtype=torch.bool, device="cuda")
    keep[parent * 8 + child] = True
    sub = subdivision_from_mask(SparseTensor(torch.zeros(len(coarse), 1, device="cuda"), coarse), keep.reshape(-1, 8))
    assert len(sub.fine_coords) == len(parent) > 800_000
    got = neighbours_from_parent(build_neighbours(coarse), sub.parent, sub.child)
    assert torch.equal(got, build_neighbours(sub.fine_coords))

