"""SC-VAE norm (LayerNorm in fp32, rounded, + optional SiLU): reference == the blocks' former torch expression
(CPU), dispatcher rules (CPU), the Triton kernel against the reference in Triton's CPU interpreter and on CUDA.

Tolerances, Triton vs reference (``failures`` applies them value by value). Both round at the same points; they
differ only in the float32 LayerNorm before the first rounding (summation order of the row statistics, rsqrt,
the affine), by at most SLACK = 2^-18 * (|w| (|n| + 1) + |b|) (n the exact normalised value; 64 float32 ulps of
the terms, the "+1" covering the mean's error for rows whose |mean| is not much larger than their spread).
Rounded, two values within SLACK end at most 1 ulp + SLACK apart; an affine that nearly cancels (n*w ~ -b) makes
that several ulps of a tiny result, hence the absolute term. SiLU is 1.1-Lipschitz, so after it the bound is
1.1 x that + 1 ulp of the output. In half precision a value moves only when the float32 result straddles a
rounding midpoint, so at most MISMATCH of the values may differ at all. The SiLU itself is checked apart: on the
kernel's own rounded LayerNorm it must equal torch's F.silu up to the float32 exp implementation (numpy's in the
interpreter, libdevice's expf on CUDA, torch's): a few ulps (SILU_MAX_ULPS; 5 seen on an H100 in <= 0.001% of
the values), in at most SILU_MISMATCH of the values.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import check_backend_order
from trellis2.kernels import vae_norm
from trellis2.kernels.vae_norm import BackendUnavailableError, reference
from trellis2.trellis2_core.models.decoder_chunking import chunk_decoder
from trellis2.trellis2_core.models.sparse_unet_vae import SparseResBlockC2S3d, _ln32

MISMATCH = 0.01  # fraction of half-precision values allowed to differ from the reference (seen: <= 0.12%)
SILU_MAX_ULPS = 8  # largest gap allowed (H100: 5 seen, in a handful of values of 2e8)
SILU_MISMATCH = 1e-3  # fraction where the kernel's SiLU differs from F.silu on the same input (seen: 0.02%)
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s values at |t| (float64), subnormal spacing at the bottom."""
    a = t.double().abs().clamp_min(torch.finfo(dtype).smallest_normal)
    return torch.exp2(torch.floor(torch.log2(a)) - _MANTISSA[dtype])


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps apart a and b are among the values of their (16-bit) dtype (+0 and -0 are one value)."""
    i, j = (t.contiguous().view(torch.int16).long() for t in (a, b))
    return (torch.where(i < 0, -(i & 0x7FFF), i) - torch.where(j < 0, -(j & 0x7FFF), j)).abs()


def failures(got, want, x, weight=None, bias=None, eps=1e-6, silu=False, what="") -> list[str]:
    """The module docstring's bounds, value by value; empty when got passes."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return [f"{what}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"]
    if want.numel() == 0:
        return []
    dt = want.dtype
    n = F.layer_norm(x.double(), x.shape[-1:], eps=eps)
    w = weight.double().abs() if weight is not None else 1.0
    b = bias.double().abs() if bias is not None else 0.0
    slack = 2.0**-18 * (w * (n.abs() + 1) + b)
    g, r = got.double(), want.double()
    if silu:
        ln = reference.layer_norm_32(x, weight, bias, eps).double()
        bound = 1.1 * (ulp(ln, dt) + slack) + ulp(torch.maximum(g.abs(), r.abs()), dt)
    else:
        bound = ulp(torch.maximum(g.abs(), r.abs()), dt) + slack
    out = []
    over = ((g - r).abs() > bound) | (torch.isnan(g) != torch.isnan(r))
    if over.any():
        out.append(f"{what}: {int(over.sum())} values beyond the bound, worst |diff| {(g - r).abs().max():.3g}")
    frac = (got != want).double().mean().item()
    if dt != torch.float32 and want.numel() >= 1000 and frac > MISMATCH:  # (one value of a tiny case may move)
        out.append(f"{what}: {frac:.3%} of the values differ (> {MISMATCH:.0%})")
    return out


def silu_failures(got_silu, got_ln, what="") -> list[str]:
    """The kernel's SiLU against F.silu on the kernel's own rounded LayerNorm (module docstring)."""
    want = F.silu(got_ln)
    if got_silu.dtype == torch.float32:
        ok = (got_silu.double() - want.double()).abs() <= 8 * ulp(want, torch.float32)
        return [] if bool(ok.all()) else [f"{what}: float32 SiLU beyond 8 ulps in {int((~ok).sum())} values"]
    apart = ulps_apart(got_silu, want)
    frac = (apart > 0).double().mean().item() if apart.numel() >= 1000 else 0.0
    # H100 (torch 2.11, triton 3.6): at most 5 ulps apart, in <= 0.001% of the values of a [200000, 1024] fp16 case
    if apart.numel() and (apart.max() > SILU_MAX_ULPS or frac > SILU_MISMATCH):
        return [f"{what}: SiLU {int(apart.max())} ulps apart, {frac:.3%} of the values differ"]
    return []


def parity(run, x, w, b, what="") -> list[str]:
    """``run`` (a Triton entry point) against the reference in every variant: affine or not, SiLU or not."""
    fails = []
    for kw in (dict(weight=w, bias=b), dict(weight=w), dict(bias=b), {}):
        ln, got = run(x, **kw), run(x, silu=True, **kw)
        tag = f"{what} {x.dtype} {tuple(x.shape)} {sorted(kw)}"
        fails += failures(ln, reference.layer_norm_32(x, **kw), x, **kw, what=tag)
        fails += failures(got, reference.layer_norm_32(x, silu=True, **kw), x, **kw, silu=True, what=tag + " silu")
        fails += silu_failures(got, ln, tag)
    return fails


def _inputs(n, c, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + n * 7 + c)
    x = (torch.randn(n, c, generator=g) * 3 + 1).to(device, dtype)
    return x, torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)


def _former(norm, feats, eps=1e-6):
    """The blocks' expression before kernels/vae_norm (sparse_unet_vae._ln32)."""
    f = feats.float()
    out = norm(f) if norm is not None else F.layer_norm(f, f.shape[-1:], eps=eps)
    return out.to(feats.dtype)


# ------------------------------------------------------------------------------------------------ reference (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [1, 3, 65, 1000])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_reference_is_the_former_expression_bit_exact(dtype, c, n):
    x, w, b = _inputs(n, c, dtype)
    ln = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b)
        for norm, kw in ((None, {}), (ln, dict(weight=ln.weight, bias=ln.bias, eps=ln.eps))):
            want = _former(norm, x)
            assert torch.equal(reference.layer_norm_32(x, **kw), want)
            assert torch.equal(reference.layer_norm_32(x, silu=True, **kw), F.silu(want))
            assert torch.equal(_ln32(norm, x), want) and torch.equal(_ln32(norm, x, silu=True), F.silu(want))
            buf = x.clone()  # in place, as the chunked decoder writes
            assert reference.layer_norm_32(buf, silu=True, out=buf, **kw) is buf and torch.equal(buf, F.silu(want))
            out = torch.full_like(x, 7.0)
            assert reference.layer_norm_32(x, out=out, **kw) is out and torch.equal(out, want)
            buf = x.clone()
            assert _ln32(norm, buf, silu=True, out=buf) is buf and torch.equal(buf, F.silu(want))
    assert reference.layer_norm_32(x, w, b).dtype == dtype


def test_ln32_lets_an_overriding_norm_module_apply_its_own_weights():
    class CastLN(torch.nn.LayerNorm):  # ComfyUI-style injected op: forward overridden
        def forward(self, x):
            return super().forward(x) * 2

    x, w, b = _inputs(9, 16, torch.float16)
    plain, cast = torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False), CastLN(16, eps=1e-6)
    with torch.no_grad():
        assert torch.equal(_ln32(plain, x), _former(plain, x))  # no affine: weight and bias are None
        assert torch.equal(_ln32(cast, x, silu=True), F.silu(_former(cast, x)))
        buf = x.clone()
        assert torch.equal(_ln32(cast, buf, out=buf), _former(cast, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_up_block_norm_in_place_is_the_former_chunk_expression(dtype):
    """Chunk by chunk, bit for bit (not against the unchunked block: torch's CPU SiLU takes a scalar path for the
    tail of a tensor, so the chunking itself moves values by an ulp; test_memory bounds that)."""
    block = SparseResBlockC2S3d(16, 8, pred_subdiv=False).to(dtype)
    feats = _inputs(103, 8, dtype, seed=5)[0]
    want = torch.cat([F.silu(_former(None, feats[r0 : r0 + 10])) for r0 in range(0, 103, 10)])
    chunk_decoder(block, 10)
    buf = feats.clone()
    assert block.conv2_input(buf) is buf and torch.equal(buf, want)


# ------------------------------------------------------------------------------------------------ dispatcher (CPU)
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(vae_norm.ENV_VAR, raising=False)
    return monkeypatch


def test_backend_order_argument_context_env(clean_env):
    assert vae_norm.ENV_VAR == "TRELLIS2_VAE_NORM_BACKEND"
    check_backend_order(vae_norm, clean_env)


def test_auto_on_cpu_runs_reference_and_explicit_triton_raises(clean_env):
    x, w, b = _inputs(5, 24, torch.float16)
    assert torch.equal(vae_norm.layer_norm_32(x, w, b, silu=True), reference.layer_norm_32(x, w, b, silu=True))
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        vae_norm.layer_norm_32(x, backend="triton")
    clean_env.setenv(vae_norm.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        vae_norm.layer_norm_32(x)
    with vae_norm.use_backend("torch"):  # the context outranks the environment
        assert torch.equal(vae_norm.layer_norm_32(x), reference.layer_norm_32(x))
    with vae_norm.use_backend("triton"), pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        _ln32(None, x, silu=True)  # the models go through the switch
    for bad in (torch.empty(5, 25), torch.empty(5, 24)):  # wrong shape, wrong dtype
        with pytest.raises(ValueError, match="out must have x's shape, dtype and device"):
            vae_norm.layer_norm_32(x, out=bad, backend="torch")


# ------------------------------------------------------------------------------------------------ parity (CUDA)
DECODER = [(200_000, c, torch.float16) for c in (64, 128, 256, 512, 1024)]  # full-size decoder rows
AWKWARD = [(n, c, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)
           for n, c in ((1, 1), (37, 3), (300, 65), (1000, 1000), (0, 64), (5, 16384))]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("n,c,dtype", DECODER + AWKWARD)
def test_triton_matches_reference(n, c, dtype):
    x, w, b = _inputs(n, c, dtype, "cuda")
    fails = parity(functools.partial(vae_norm.layer_norm_32, backend="triton"), x, w, b, "cuda")
    assert not fails, "\n".join(fails[:20])


@pytest.mark.cuda
def test_triton_in_place_auto_and_refused_layouts(clean_env):
    buf = _inputs(5000, 96, torch.float16, "cuda")[0]
    rows = buf[1000:4000]  # a chunk of the up block's features, written back in place (programs run concurrently)
    want, keep = vae_norm.layer_norm_32(rows, silu=True, backend="triton"), buf.clone()
    assert vae_norm.layer_norm_32(rows, silu=True, out=rows) is rows and torch.equal(rows, want)  # auto: triton
    assert torch.equal(buf[:1000], keep[:1000]) and torch.equal(buf[4000:], keep[4000:])
    xf = keep.float()  # auto keeps float32 on the reference
    assert torch.equal(vae_norm.layer_norm_32(xf), reference.layer_norm_32(xf))
    x = keep[:65, :32]
    refused = [dict(x=x.t()), dict(x=x[:-1], out=x[1:]),
               dict(x=x, weight=torch.ones(32, device="cuda", dtype=torch.float16)), dict(x=x, weight=torch.ones(32))]
    for kw in refused:  # channels not contiguous; out = x shifted by a row; weight not float32; weight on the CPU
        with pytest.raises(BackendUnavailableError, match="does not take these tensors"):
            vae_norm.layer_norm_32(**kw, backend="triton")
    for kw in refused[:2]:  # auto quietly runs the reference
        want = reference.layer_norm_32(kw["x"].clone())
        assert torch.equal(vae_norm.layer_norm_32(**kw), want)
    w = torch.ones(96, device="cuda", requires_grad=True)  # the kernel has no backward: autograd keeps the reference
    assert vae_norm.layer_norm_32(keep, w).requires_grad
    with pytest.raises(BackendUnavailableError, match="no backward"):
        vae_norm.layer_norm_32(keep, w, backend="triton")


@pytest.mark.cuda
def test_row_counts_do_not_recompile_the_kernel():
    """Every decoder level has another voxel count: no new compile once one ran (the row count is not specialised)."""
    from trellis2.kernels.vae_norm import triton as tk

    def compiled() -> int:
        caches = getattr(tk._layer_norm_kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this triton keeps no device_caches to count compiles in")
        return sum(len(entry[0]) for entry in caches.values())

    counts = []
    for n in (40_000, 40_001, 40_016, 51_234):  # all large enough for the same tile rule
        x = _inputs(n, 64, torch.float16, "cuda")[0]
        vae_norm.layer_norm_32(x, silu=True, backend="triton")
        counts.append(compiled())
    assert counts[1:] == counts[:1] * 3, f"compiled kernels after each row count: {counts}"


# ------------------------------------------------------------------------------------- Triton interpreter (CPU)
_INTERP_SCRIPT = r"""
import functools, itertools, sys
sys.path.insert(0, sys.argv[1])  # this tests folder: the bounds live in one place
import torch
from test_kernels_vae_norm import _inputs, failures, parity
from trellis2.kernels.vae_norm import reference as R, triton as T
bad, n = [], 0
for dt, c, m in itertools.product((torch.float32, torch.float16, torch.bfloat16), (1, 3, 64, 65, 1000), (1, 37)):
    x, w, b = _inputs(m, c, dt)
    assert all(T.supports(x, **kw) for kw in (dict(weight=w, bias=b), dict(weight=w), dict(bias=b), {}))
    bm = None if m == 1 else 16  # 16-row tiles: the interpreter runs programs one by one; the last crosses the end
    bad += parity(functools.partial(T.layer_norm_32, block_m=bm), x, w, b, "interpreter")
    n += 8
# statistics of the rounding at a decoder width (5 programs of 64 rows), and the layouts the decoders pass
for dt in (torch.float16, torch.bfloat16):
    x, w, b = _inputs(300, 256, dt, seed=1)
    bad += parity(T.layer_norm_32, x, w, b, "interpreter, default launch")
    buf = x.clone()
    want = T.layer_norm_32(x[40:250], silu=True, block_m=32)
    assert T.supports(buf[40:250], out=buf[40:250])
    T.layer_norm_32(buf[40:250], silu=True, out=buf[40:250], block_m=32)
    assert torch.equal(buf[40:250], want) and torch.equal(buf[:40], x[:40]) and torch.equal(buf[250:], x[250:])
    out = torch.full_like(x, 9.0)
    assert T.supports(x, w, b, out=out) and T.layer_norm_32(x, w, b, out=out) is out
    bad += failures(out, R.layer_norm_32(x, w, b), x, w, b, what=f"{dt} out=")
    wide = _inputs(37, 80, dt, seed=2)[0]
    for xs in (wide[:, 5:69], wide[:36, :64].reshape(2, 18, 64)):  # rows of a wider buffer, row stride 80
        assert T.supports(xs, w[:64], b[:64])
        got = T.layer_norm_32(xs, w[:64], b[:64], silu=True, block_m=8)
        assert got.is_contiguous() and got.shape == xs.shape
        bad += failures(got, R.layer_norm_32(xs, w[:64], b[:64], silu=True), xs, w[:64], b[:64], silu=True,
                        what=f"{dt} strided {tuple(xs.shape)} {xs.stride()}")
    empty = torch.empty(0, 64, dtype=dt)
    assert T.supports(empty) and T.layer_norm_32(empty, silu=True).shape == (0, 64)
    n += 14
# layouts it must refuse (the dispatcher then runs the reference, or raises for an explicit "triton")
x = _inputs(65, 32, torch.float16)[0]
refused = [dict(x=x.t()), dict(x=x[:-1], out=x[1:]), dict(x=x.double()), dict(x=torch.empty(2, 0)),
           dict(x=torch.empty(2, T.MAX_C + 1, dtype=torch.float16)), dict(x=x, weight=torch.ones(32).half()),
           dict(x=x, bias=torch.ones(33)), dict(x=x, weight=torch.ones(64)[::2]),
           dict(x=x, out=torch.empty(65, 32, dtype=torch.float16).t().contiguous().t())]
for kw in refused:
    if T.supports(**kw):
        bad.append(f"supports() took {[(k, tuple(v.shape), v.stride(), v.dtype) for k, v in kw.items()]}")
print("checked", n, "cases")
if bad:
    sys.exit("\n".join(bad[:20]))
"""


def test_triton_kernel_in_interpreter_matches_reference(tmp_path):
    """The Triton kernel runs on CPU in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported, hence a subprocess) against the reference: every dtype, affine or not, SiLU or not, awkward widths,
    tiles crossing the last row, in place, strided rows, and the layouts ``supports`` must refuse."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked" in proc.stdout
