"""Sparse-conv backends: dispatcher rules (CPU) and Triton-vs-reference parity over a zoo of sizes (CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trellis2.kernels import sparse_conv as spconv
from trellis2.kernels.sparse_conv import BackendUnavailableError, build_neighbours, reference
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse.conv import SparseConv3d

# Relative-norm tolerance of the Triton kernel against the fp32 reference on the same (rounded) inputs.
# fp32 runs exact fp32 products (tf32 off, torch's default); half types accumulate in fp32 but round the output.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

SIZES_N = (0, 1, 7, 97, 1000, 65537)
CHANNELS = ((8, 8), (8, 32), (32, 96), (64, 64), (96, 128), (128, 8))
WIDE = ((97, 1024, 1024), (1000, 1024, 96))  # 1024 channels only where it stays quick


def shell_coords(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 4] int32 unique voxels, two batch items, ~30% dense so tiles see present and missing neighbours."""
    if n == 0:
        return torch.empty(0, 4, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    side = max(3, round((3.5 * n / 2) ** (1 / 3)))
    cells = torch.randperm(2 * side**3, generator=g)[:n]
    b, r = cells // side**3, cells % side**3
    c = torch.stack([b, r // (side * side), r // side % side, r % side], 1)
    return c[torch.argsort(b, stable=True)].int()


# ------------------------------------------------------------------------------------------------ dispatcher (CPU)
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(spconv.ENV_VAR, raising=False)
    return monkeypatch


def _small_case(dtype=torch.float32):
    coords = shell_coords(40, seed=3)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(coords), 5, generator=g).to(dtype)
    w = torch.randn(4, 3, 3, 3, 5, generator=g).to(dtype)
    return feats, build_neighbours(coords), w, torch.randn(4, generator=g).to(dtype)


def test_auto_on_cpu_uses_reference(clean_env):
    f, nbr, w, b = _small_case()
    assert spconv.resolve_backend(f.device) == "torch"
    torch.testing.assert_close(spconv.submanifold_conv3d(f, nbr, w, b), reference.submanifold_conv3d(f, nbr, w, b))


def test_torch_backend_chunking_passes_through(clean_env):
    """The dispatcher forwards the memory bounds; any chunking gives the unchunked result (issue 9)."""
    f, nbr, w, b = _small_case(torch.float64)
    full = spconv.submanifold_conv3d(f, nbr, w, b, backend="torch", chunk_rows=len(f))
    for rows in (1, 7, 13):
        torch.testing.assert_close(spconv.submanifold_conv3d(f, nbr, w, b, chunk_rows=rows), full, rtol=1e-12, atol=1e-12)
    tiny = spconv.submanifold_conv3d(f, nbr, w, b, max_bytes=27 * 5 * 8 * 3)  # 3 rows per chunk
    torch.testing.assert_close(tiny, full, rtol=1e-12, atol=1e-12)


def test_explicit_triton_on_cpu_raises_naming_cuda(clean_env):
    f, nbr, w, b = _small_case()
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        spconv.submanifold_conv3d(f, nbr, w, b, backend="triton")


def test_explicit_triton_without_triton_raises_naming_triton(clean_env):
    clean_env.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    clean_env.delitem(sys.modules, "trellis2.kernels.sparse_conv.triton", raising=False)
    with pytest.raises(BackendUnavailableError, match="triton cannot be imported"):
        spconv.resolve_backend(torch.device("cuda"), "triton")
    assert spconv.resolve_backend(torch.device("cuda")) == "torch"  # auto falls back quietly


def test_env_var_read_at_call_time(clean_env):
    f, nbr, w, b = _small_case()
    spconv.submanifold_conv3d(f, nbr, w, b)  # works before the variable is set
    clean_env.setenv(spconv.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError):
        spconv.submanifold_conv3d(f, nbr, w, b)
    conv = SparseConv3d(5, 4)  # the module goes through the dispatcher too
    with pytest.raises(BackendUnavailableError):
        conv(SparseTensor(f, shell_coords(40, seed=3)))
    clean_env.setenv(spconv.ENV_VAR, "Reference")
    assert spconv.requested_backend() == "torch"
    clean_env.setenv(spconv.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=spconv.ENV_VAR):
        spconv.submanifold_conv3d(f, nbr, w, b)


def test_precedence_argument_context_env(clean_env):
    clean_env.setenv(spconv.ENV_VAR, "triton")
    with spconv.use_backend("torch"):
        assert spconv.requested_backend() == "torch"  # context beats env
        with spconv.use_backend("triton"):
            assert spconv.requested_backend() == "triton"  # innermost context wins
            assert spconv.requested_backend("auto") == "auto"  # argument beats context
        assert spconv.requested_backend() == "torch"
    assert spconv.requested_backend() == "triton"
    with pytest.raises(ValueError, match="use_backend"):
        with spconv.use_backend("fast"):
            pass


def test_import_does_not_import_triton():
    code = "import sys, trellis2.kernels.sparse_conv, trellis2.trellis2_core.sparse.conv; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.cuda
def test_autotune_choices_persist_across_processes(tmp_path):
    """The Triton kernels keep their autotune choice per (channels, dtype) in Triton's cache dir: a second process
    with the same dir takes it from there and times no config (H100, the first 1024_cascade generation of a new
    process: 20.1 -> 12.9 s, bench/RESULTS.md session 9)."""
    code = (
        "import torch\n"
        "from triton.runtime import autotuner\n"
        "timed = []\n"
        "bench = autotuner.Autotuner._bench\n"
        "autotuner.Autotuner._bench = lambda self, *a, **k: timed.append(1) or bench(self, *a, **k)\n"
        "from trellis2.kernels import sparse_conv as spconv\n"
        "g = torch.Generator().manual_seed(0)\n"
        "coords = torch.unique(torch.randint(0, 24, (3000, 3), generator=g), dim=0)\n"
        "coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).int().cuda()\n"
        "feats = torch.randn(len(coords), 32, device='cuda', dtype=torch.float16)\n"
        "w = torch.randn(48, 3, 3, 3, 32, device='cuda', dtype=torch.float16) / 16\n"
        "out = spconv.submanifold_conv3d(feats, spconv.build_neighbours(coords), w, backend='triton')\n"
        "torch.cuda.synchronize()\n"
        "print(len(timed), bool(torch.isfinite(out).all()))\n"
    )
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    (first, ok1), (second, ok2) = (run.stdout.split() for run in runs)
    assert ok1 == ok2 == "True"
    assert int(first) > 0, "the first process should have timed the configs (a fresh cache dir)"
    assert int(second) == 0, "the second process timed configs again: the autotune choice was not cached"
    assert list(tmp_path.rglob("*.autotune.json")), "no autotune result in the cache dir"


# ------------------------------------------------------------------------------------------------ parity (CUDA)
def _poisoned_empty(n: int, co: int, dtype: torch.dtype) -> None:
    """Leave NaNs in the allocator's next block of this size, so an unwritten output element cannot pass."""
    torch.full((n, co), float("nan"), dtype=dtype, device="cuda")


def _parity(n: int, ci: int, co: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> None:
    coords = shell_coords(n, seed=seed + ci).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed)
    feats = torch.randn(n, ci, device="cuda", generator=g).to(dtype)
    w = (torch.randn(co, 3, 3, 3, ci, device="cuda", generator=g) / (27 * ci) ** 0.5).to(dtype)
    b = torch.randn(co, device="cuda", generator=g).to(dtype) if bias else None
    nbr = build_neighbours(coords)
    expected = reference.submanifold_conv3d(feats.float(), nbr, w.float(), None if b is None else b.float())
    _poisoned_empty(n, co, dtype)
    out = spconv.submanifold_conv3d(feats, nbr, w, b, backend="triton")
    assert out.shape == (n, co) and out.dtype == dtype
    if n == 0:
        return
    assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= TOLERANCES[dtype], f"N={n} Ci={ci} Co={co} {dtype}: rel err {err:.2e} > {TOLERANCES[dtype]:.0e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("ci,co", CHANNELS)
@pytest.mark.parametrize("n", SIZES_N)
def test_triton_matches_reference(n, ci, co, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _parity(n, ci, co, dtype, bias=(ci + co) % 3 != 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("n,ci,co", WIDE)
def test_triton_matches_reference_wide(n, ci, co, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _parity(n, ci, co, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_triton_on_rows_of_a_map_matches_those_rows(dtype):
    """Rows r0:r1 of a level's map give those output rows from all of the level's features (a chunked decoder)."""
    n, ci, co = 5000, 64, 96
    coords = shell_coords(n, seed=11).cuda()
    g = torch.Generator(device="cuda").manual_seed(11)
    feats = torch.randn(n, ci, device="cuda", generator=g).to(dtype)
    w = (torch.randn(co, 3, 3, 3, ci, device="cuda", generator=g) / (27 * ci) ** 0.5).to(dtype)
    nbr = build_neighbours(coords)
    expected = reference.submanifold_conv3d(feats.float(), nbr, w.float())
    for r0, r1 in ((0, 1), (0, 1300), (1300, 4097), (4000, n)):
        out = spconv.submanifold_conv3d(feats, nbr[r0:r1], w, backend="triton")
        assert out.shape == (r1 - r0, co) and out.dtype == dtype
        err = ((out.double() - expected[r0:r1].double()).norm() / expected[r0:r1].double().norm()).item()
        assert err <= TOLERANCES[dtype], f"rows {r0}:{r1} {dtype}: rel err {err:.2e}"


@pytest.mark.cuda
def test_triton_row_order_and_module_path():
    """Shuffled rows (no tile-skip luck) and the SparseConv3d module under auto (-> triton on CUDA)."""
    coords = shell_coords(5000, seed=7)
    coords = coords[torch.randperm(len(coords))].cuda()
    conv = SparseConv3d(64, 32, device="cuda", dtype=torch.float16)
    x = SparseTensor(torch.randn(len(coords), 64, device="cuda", dtype=torch.float16), coords)
    assert spconv.resolve_backend(x.device) == "triton"
    out = conv(x).feats
    w32, b32 = conv.weight.float(), conv.bias.float()
    ref = reference.submanifold_conv3d(x.feats.float(), build_neighbours(coords), w32, b32)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOLERANCES[torch.float16]
