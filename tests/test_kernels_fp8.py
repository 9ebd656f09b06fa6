"""FP8 e4m3 row quantisation and scaled GEMM: the reference against an independent float64 emulation of its rule
(CPU), the dispatcher (CPU), the Triton kernel against the reference in Triton's CPU interpreter and on CUDA, and
the CUDA GEMM paths against the float64 GEMM of the dequantised operands.

Tolerances (all here; ``quant_failures`` and ``gemm_failures`` apply them value by value):
- quantisation without GELU: none. The kernel computes the reference's float32 operations (exact row max, IEEE
  divisions, one rounded product) and builds the nearest-even e4m3 code from the bits, so codes and scales are
  equal bit for bit, in the interpreter and on the GPU.
- quantisation with GELU: the float32 tanh differs (torch's CPU Sleef tanh, libdevice tanhf on the GPU, an exp
  formula in the interpreter) by ~1 float32 ulp of tanh, i.e. an absolute error of GELU up to ~|x| 2^-25 (where
  0.5 x (1 + tanh) cancels, many ulps of a tiny value). So a scale may move by GELU_SCALE_REL of itself plus
  GELU_SCALE_ABS * max|x| / 448, and a code may move to its neighbour (never further), in at most
  GELU_MISMATCH of the values of a case (interpreter: <= 0.03% seen).
- GEMMs, against the float64 GEMM of the exactly dequantised operands: float32 accumulation within
  ACCUM * sum_k |a_k w_k| (a 40x margin over the random-walk error at K = 8192, far below K * 2^-24);
  torch._scaled_mm within FP8_ACCUM * sum_k |a_k w_k| (Hopper's FP8 tensor cores keep ~14 bits while they
  accumulate, DeepSeek-V3 report 3.3.2; CUTLASS moves the sums to float32 every few MMAs); the
  output's rounding within OUT_ULPS ulps of the output dtype; a bias rounded to bfloat16 by the fast path,
  BIAS_REL of |bias|; the dequantising fallback rounds each operand to fp16/bf16 (unit roundoff u), within
  FALLBACK_OPERAND * sqrt(sum_k (a_k w_k)^2), ~20 standard deviations (u sqrt(2/3) of that root) of the sum of
  those roundings, leaving room for the output rounding and cuBLAS's reduced-precision fp16 reductions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import check_backend_order
from trellis2.kernels import fp8
from trellis2.kernels.fp8 import BackendUnavailableError, reference

GELU_MISMATCH = 1e-3
GELU_SCALE_REL = 2.0**-21
GELU_SCALE_ABS = 2.0**-22
ACCUM = 2.0**-18
FP8_ACCUM = 2.0**-12
OUT_ULPS = {torch.float32: 2, torch.bfloat16: 2, torch.float16: 2}
BIAS_REL = 2.0**-8
FALLBACK_OPERAND = {torch.float16: 2.0**-7, torch.bfloat16: 2.0**-4}  # ~20 sigma; CPU emulation: 7.5 sigma seen
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s values at |t| (float64), subnormal spacing at the bottom."""
    a = t.double().abs().clamp_min(torch.finfo(dtype).smallest_normal)
    return torch.exp2(torch.floor(torch.log2(a)) - _MANTISSA[dtype])


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """float64 v rounded to the e4m3 grid, nearest even, saturated at +-448 (steps 2^(e-3), 2^-9 below 2^-6)."""
    a = v.abs()
    step = torch.where(a >= 2.0**-6, torch.exp2(torch.floor(torch.log2(a)) - 3), torch.full_like(a, 2.0**-9))
    return (torch.round(v / step) * step).clamp(-448, 448)


def order(q: torch.Tensor) -> torch.Tensor:
    """Signed position of each e4m3 code among the values (+0 and -0 share 0): neighbours differ by 1."""
    c = q.contiguous().view(torch.uint8).long()
    return torch.where(c >= 128, -(c & 0x7F), c)


def quant_failures(q, s, x, gelu=False, what="") -> list[str]:
    """The kernel's (q, s) against ``reference.quantize_rows`` on the same device (module docstring)."""
    want_q, want_s = reference.quantize_rows(x, gelu=gelu)
    if q.shape != want_q.shape or s.shape != want_s.shape or q.dtype != fp8.E4M3 or s.dtype != torch.float32:
        return [f"{what}: got {tuple(q.shape)} {q.dtype} / {tuple(s.shape)} {s.dtype}"]
    if not q.is_contiguous() or q.numel() == 0:
        return [] if q.is_contiguous() else [f"{what}: q is not contiguous"]
    nan_q, nan_wq = torch.isnan(q.float()), torch.isnan(want_q.float())
    out = [] if torch.equal(nan_q, nan_wq) and torch.equal(s.isnan(), want_s.isnan()) else [f"{what}: NaN differ"]
    ok = ~nan_wq
    apart = (order(q) - order(want_q))[ok].abs()
    if not gelu:
        if not torch.equal(q.view(torch.uint8)[ok], want_q.view(torch.uint8)[ok]):
            out.append(f"{what}: {int((apart > 0).sum())} codes differ (max {int(apart.max())} apart), want none")
        if not torch.equal(s.nan_to_num(), want_s.nan_to_num()):
            out.append(f"{what}: {int((s != want_s).sum())} scales differ, want none")
        return out
    xmax = x.float().abs().amax(-1, keepdim=True).double()
    bound = GELU_SCALE_REL * want_s.double() + GELU_SCALE_ABS * xmax / 448
    if ((s.double() - want_s.double()).abs() > bound).any():
        out.append(f"{what}: scales beyond the GELU bound, worst {(s.double() / want_s.double() - 1).abs().max():.3g}")
    frac = (apart > 0).double().mean().item()
    if apart.numel() and (apart.max() > 1 or (apart.numel() >= 1000 and frac > GELU_MISMATCH)):
        out.append(f"{what}: GELU codes up to {int(apart.max())} apart, {frac:.4%} differ")
    return out


def gemm_failures(got, q, scale, wq, wscale, bias, what="", fallback=None, accum=ACCUM) -> list[str]:
    """A scaled GEMM's result against the float64 GEMM of the dequantised operands (module docstring);
    ``fallback``: the dtype the dequantising fallback rounded its operands to, else None."""
    a = (q.double() * scale.double()).reshape(-1, q.shape[-1])
    w = wq.double() * wscale.double()[:, None]
    want = a @ w.T + (0.0 if bias is None else bias.double())
    if got.shape != (*q.shape[:-1], wq.shape[0]):
        return [f"{what}: shape {tuple(got.shape)}, want {(*q.shape[:-1], wq.shape[0])}"]
    g = got.reshape(want.shape).double()
    bound = accum * (a.abs() @ w.abs().T) + OUT_ULPS[got.dtype] * ulp(torch.maximum(g.abs(), want.abs()), got.dtype)
    if bias is not None:
        bound = bound + BIAS_REL * bias.double().abs()
    if fallback is not None:
        bound = bound + FALLBACK_OPERAND[fallback] * ((a * a) @ (w * w).T).sqrt()
    over = (g - want).abs() > bound
    if not over.any():
        return []
    return [f"{what}: {int(over.sum())} of {over.numel()} values beyond the bound, worst {(g - want).abs().max():.3g}"]


def _rows(shape, dtype, device="cpu", seed=0):
    """Rows spanning ~2^16 in magnitude (so subnormal codes occur), row scales 2^-6..2^6, some exact zeros."""
    g = torch.Generator().manual_seed(seed + sum(shape) * 7)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 5, shape, generator=g).float())
    if len(shape) > 1:
        x = x * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float())
    x[..., ::11] = 0.0
    return x.to(device, dtype)


def _gemm_operands(lead, k, n, device="cpu", bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed + k + n)
    x = torch.randn(*lead, k, generator=g).to(device, torch.bfloat16)
    wq, wscale = fp8.quantize_weight((torch.randn(n, k, generator=g) / math.sqrt(k)).to(device))
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(device, bias_dtype)
    return (*fp8.quantize_rows(x, backend="torch"), wq, wscale, bias)


# ------------------------------------------------------------------------------------------------ reference (CPU)
SHAPES = [(5,), (7, 1), (3, 33), (2, 3, 64), (2, 2, 3, 17), (0, 16), (2, 0, 8), (4, 1536)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_its_rule_in_float64(shape, dtype):
    """Codes and scales equal an independent emulation: correctly rounded float32 division and product (float64
    then rounded once), nearest-even e4m3 rounding of that product; q contiguous, scale [..., 1]."""
    x = _rows(shape, dtype)
    q, s = reference.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], 1)
    h = x.double()  # exact; float64 division and product rounded once to float32 are the correctly rounded ones
    amax = h.abs().amax(-1, keepdim=True).clamp_min(torch.tensor(reference.AMAX_FLOOR).float().item())
    top = torch.full_like(amax, 448.0)  # (448.0 / t would be t.reciprocal() * 448)
    assert torch.equal(q.double(), e4m3_round((h * (top / amax).float().double()).float().double()))
    assert torch.equal(s, (amax / top).float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_round_trip_within_half_an_e4m3_step(dtype):
    x = _rows((64, 300), dtype, seed=3).float()
    q, s = reference.quantize_rows(x)
    v = x.double() / s.double()  # the value in code units
    half_step = torch.maximum(2.0**-4 * v.abs(), torch.full_like(v, 2.0**-10))
    err = (q.double() * s.double() - x.double()).abs() / s.double()
    assert (err <= half_step * (1 + 2.0**-20) + 2.0**-22 * v.abs()).all(), f"worst {(err / half_step).max():.3g}"
    assert ((q.float() == 0) & (x != 0)).any() and (q.float().abs() < 2.0**-6).any()  # the subnormal floor is used


def test_reference_extremes_zero_rows_and_non_finite_values():
    x = torch.tensor([[3.0, -7.0, 0.5], [1e-3, 2e-3, -4e-3], [0.0, 0.0, 0.0], [0.0, -0.0, 1e-30],
                      [1.0, float("nan"), 2.0], [1.0, float("inf"), -2.0]])  # fmt: skip
    q, s = fp8.quantize_rows(x)
    assert q[0, 1].item() == -448 and q[1, 2].item() == -448  # the row's largest |value| maps exactly to +-448
    assert (q[2:4].float() == 0).all() and torch.isfinite(s[2:4]).all() and (s[2:4] > 0).all()
    assert s[3].item() == pytest.approx(reference.AMAX_FLOOR / 448) and q[3, 1].view(torch.uint8).item() == 0x80
    assert q[4].float().isnan().all() and s[4].isnan().all()  # a NaN makes the whole row NaN
    assert q[5, 1].float().isnan() and (q[5, [0, 2]].float() == 0).all() and s[5].isinf().all()
    # rows where 448 / amax computed as amax.reciprocal() * 448 (two roundings; what ``448.0 / t`` does) moves the
    # second code to the other side of a midpoint: the rule is one IEEE division
    x = torch.tensor([[3.2207579612731934, 0.007638516370207071], [3.044825553894043, 0.0072212666273117065]])
    assert fp8.quantize_rows(x)[0][:, 1].tolist() == [1.0, 1.125]
    assert ((x * (448.0 / x[:, :1])).to(fp8.E4M3).float()[:, 1]).tolist() == [1.125, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_gelu_quantises_gelu_tanh_in_float32(dtype):
    x = _rows((9, 77), dtype, seed=4)
    q, s = reference.quantize_rows(x, gelu=True)
    want_q, want_s = reference.quantize_rows(F.gelu(x.float(), approximate="tanh"))
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    assert not torch.equal(q.view(torch.uint8), reference.quantize_rows(x)[0].view(torch.uint8))


def test_reference_takes_any_layout():
    wide = _rows((40, 96), torch.bfloat16, seed=5)
    for view in (wide[:, 7:40], wide[::3, :32], wide[:36].view(2, 18, 96)[:, :, 5:69], wide.t()[:20], wide[:, ::2]):
        q, s = fp8.quantize_rows(view)
        want_q, want_s = reference.quantize_rows(view.contiguous())
        assert q.is_contiguous() and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(s, want_s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_weight_is_the_row_rule_with_a_flat_scale(dtype):
    w = _rows((48, 40), dtype, seed=6)
    q, s = fp8.quantize_weight(w)
    want_q, want_s = reference.quantize_rows(w)
    assert q.shape == (48, 40) and q.dtype == fp8.E4M3 and q.is_contiguous() and s.shape == (48,)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s.view(-1))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fp8.quantize_weight(w[0])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fp8.quantize_weight(w.double())


@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [(), (1,), (37,), (2, 5), (2, 3, 4), (0,), (3, 0)])
def test_reference_gemm_is_the_float64_gemm_of_the_dequantised_operands(lead, bias_dtype):
    q, s, wq, ws, b = _gemm_operands(lead, 48, 24, bias_dtype=bias_dtype)
    got = reference.scaled_linear(q, s, wq, ws, b, out_dtype=torch.float32)
    assert got.shape == (*lead, 24) and not gemm_failures(got, q, s, wq, ws, b, "reference")
    bf = reference.scaled_linear(q, s, wq, ws, b, out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, got.to(torch.bfloat16))  # one rounding
    auto = fp8.scaled_linear(q, s, wq, ws, b, out_dtype=torch.float16)  # CPU "auto" is the reference
    assert torch.equal(auto, reference.scaled_linear(q, s, wq, ws, b, out_dtype=torch.float16))
    if got.numel() and b is not None:  # the bound is tight enough to see a lost bias or a scale on the wrong axis
        assert gemm_failures(got - b.float(), q, s, wq, ws, b)
        flipped = reference.scaled_linear(q, s, wq, ws.flip(0), b, out_dtype=torch.float32)
        assert gemm_failures(flipped, q, s, wq, ws, b)


def test_scaled_linear_names_the_argument_that_does_not_fit():
    q, s, wq, ws, b = _gemm_operands((4,), 32, 16, bias_dtype=torch.float32)
    bad = [(dict(q=q.float()), TypeError, "q must be float8_e4m3fn"), (dict(wq=wq[:, :16]), ValueError, "wq must"),
           (dict(scale=s.view(4)), ValueError, "scale must be float32"), (dict(wscale=ws[:8]), ValueError, "wscale"),
           (dict(bias=b[:3]), ValueError, "bias must"),
           (dict(out_dtype=torch.int8), TypeError, "out_dtype")]  # fmt: skip
    for change, exc, msg in bad:
        kw = dict(q=q, scale=s, wq=wq, wscale=ws, bias=b, out_dtype=torch.float32) | change
        with pytest.raises(exc, match=msg):
            fp8.scaled_linear(**kw)
    with pytest.raises(ValueError, match="K >= 1"):
        fp8.quantize_rows(torch.empty(3, 0))


# ------------------------------------------------------------------------------------------------ dispatcher (CPU)
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(fp8.ENV_VAR, raising=False)
    return monkeypatch


def test_backend_order_argument_context_env(clean_env):
    assert fp8.ENV_VAR == "TRELLIS2_FP8_BACKEND"
    check_backend_order(fp8, clean_env, lambda backend=None: fp8.quantize_rows(torch.ones(2, 4), backend=backend))


def test_explicit_triton_on_cpu_raises_naming_cuda(clean_env):
    x = _rows((5, 32), torch.bfloat16)
    q, s, wq, ws, _ = _gemm_operands((5,), 32, 16)
    assert not fp8.fp8_matmul_supported("cpu") and not fp8.fp8_matmul_supported(torch.device("meta"))
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        fp8.quantize_rows(x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        fp8.scaled_linear(q, s, wq, ws, out_dtype=torch.bfloat16, backend="triton")
    clean_env.setenv(fp8.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        fp8.quantize_rows(x, gelu=True)
    with fp8.use_backend("torch"):  # the context outranks the environment
        assert torch.equal(fp8.quantize_rows(x)[1], reference.quantize_rows(x)[1])
        assert torch.equal(fp8.scaled_linear(q, s, wq, ws, out_dtype=torch.bfloat16),
                           reference.scaled_linear(q, s, wq, ws, out_dtype=torch.bfloat16))  # fmt: skip


# ------------------------------------------------------------------------------------------------ CUDA
AWKWARD = [(0, 1536), (1, 1), (1, 8192), (97, 7), (97, 1000), (30011, 1536), (30011, 8192), (5, 16384)]


@pytest.mark.cuda
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["hw-cvt", "int-rounding"])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", AWKWARD)
def test_triton_quantize_rows_matches_reference(m, k, dtype, gelu, hw_cvt, monkeypatch):
    from trellis2.kernels.fp8 import triton as tk

    if hw_cvt and not tk._hw_cvt(torch.device("cuda")):
        pytest.skip("this GPU has no fp32 -> e4m3 conversion instruction (compute capability < 8.9)")
    monkeypatch.setattr(tk, "_hw_cvt", lambda device: hw_cvt)  # both ways of forming the code, on one GPU
    x = _rows((m, k), dtype, "cuda")
    q, s = fp8.quantize_rows(x, gelu=gelu, backend="triton")
    fails = quant_failures(q, s, x, gelu, f"cuda {dtype} [{m}, {k}] gelu={gelu}")
    assert not fails, "\n".join(fails[:20])


@pytest.mark.cuda
def test_triton_layouts_non_finite_rows_and_auto_dispatch(clean_env):
    from trellis2.kernels.fp8 import triton as tk

    wide = _rows((300, 1600), torch.bfloat16, "cuda", seed=2)
    for view in (wide[:, 7:1543], wide[::3, :1536], wide[:298].view(2, 149, 1600)[..., :64], wide.t()[:40]):
        fails = quant_failures(*fp8.quantize_rows(view, backend="triton"), view, what=f"strides {view.stride()}")
        assert not fails, fails
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), -2.0], [0.0, -0.0, 0.0]], device="cuda")
    assert not quant_failures(*fp8.quantize_rows(x, backend="triton"), x, what="non-finite rows")
    real_hw = tk._hw_cvt
    clean_env.setattr(tk, "_hw_cvt", lambda device: False)  # the integer rounding on the GPU too
    assert not quant_failures(*fp8.quantize_rows(x, backend="triton"), x, what="non-finite rows, integer rounding")
    clean_env.setattr(tk, "_hw_cvt", real_hw)
    calls, real = [], tk.quantize_rows
    clean_env.setattr(tk, "quantize_rows", lambda *a, **kw: (calls.append(a[0].dtype), real(*a, **kw))[1])
    for dt in DTYPES:  # auto: the kernel for all three dtypes
        fp8.quantize_rows(wide[:4].to(dt))
    assert calls == DTYPES
    too_wide = torch.ones(2, tk.MAX_K + 1, device="cuda")
    assert torch.equal(fp8.quantize_rows(too_wide)[1], reference.quantize_rows(too_wide)[1]) and len(calls) == 3
    with pytest.raises(BackendUnavailableError, match="rows of 1 to 16384"):
        fp8.quantize_rows(too_wide, backend="triton")


GEMMS = [((1,), 1536, 1536), ((97,), 1536, 4608), ((4099,), 1536, 8192), ((4099,), 8192, 1536), ((2, 50), 64, 32),
         ((0,), 1536, 1536), ((2, 0), 32, 16)]  # (leading dims, K, N): the DiT's widths, then small and empty ones


@pytest.mark.cuda
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,k,n", GEMMS)
def test_scaled_mm_fast_path_matches_the_dequantised_gemm(lead, k, n, bias_dtype, clean_env):
    if not fp8.fp8_matmul_supported("cuda"):
        pytest.skip("this GPU / torch build has no row-wise torch._scaled_mm")
    q, s, wq, ws, b = _gemm_operands(lead, k, n, "cuda", bias_dtype)
    got = fp8.scaled_linear(q, s, wq, ws, b, out_dtype=torch.bfloat16, backend="triton")
    assert got.dtype == torch.bfloat16 and got.shape == (*lead, n)
    fails = gemm_failures(got, q, s, wq, ws, b, f"_scaled_mm {lead} K={k} N={n} {bias_dtype}", accum=FP8_ACCUM)
    assert not fails, fails
    assert torch.equal(fp8.scaled_linear(q, s, wq, ws, b, out_dtype=torch.bfloat16), got)  # auto takes it


@pytest.mark.cuda
@pytest.mark.parametrize("out,k,n", [(torch.float16, 1536, 512), (torch.bfloat16, 40, 24), (torch.float32, 96, 48)])
def test_dequantising_fallback_matches_the_dequantised_gemm(out, k, n, clean_env):
    clean_env.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the float32 case: a float32 GEMM
    q, s, wq, ws, b = _gemm_operands((2, 300), k, n, "cuda", torch.float32)
    got = fp8.scaled_linear(q, s, wq, ws, b, out_dtype=out)  # fp16/fp32 out or K % 16: never _scaled_mm
    fails = gemm_failures(got, q, s, wq, ws, b, f"fallback {out}", None if out == torch.float32 else out)
    assert got.dtype == out and not fails, fails
    with pytest.raises(BackendUnavailableError, match="bfloat16|multiples of 16|compute capability"):
        fp8.scaled_linear(q, s, wq, ws, b, out_dtype=out, backend="triton")


@pytest.mark.cuda
def test_quantize_and_gemm_replay_in_a_cuda_graph():
    if not fp8.fp8_matmul_supported("cuda"):
        pytest.skip("this GPU / torch build has no row-wise torch._scaled_mm")
    x = _rows((777, 1536), torch.bfloat16, "cuda")
    _, _, wq, ws, b = _gemm_operands((1,), 1536, 4608, "cuda", torch.bfloat16)

    def step():
        q, s = fp8.quantize_rows(x, gelu=True, backend="triton")
        return fp8.scaled_linear(q, s, wq, ws, b, out_dtype=torch.bfloat16, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compile, the probe) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(_rows((777, 1536), torch.bfloat16, "cuda", seed=9))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


@pytest.mark.cuda
def test_row_counts_do_not_recompile_the_kernel():
    """Every token count is another M: no new compile once one ran (M is not specialised)."""
    from trellis2.kernels.fp8 import triton as tk

    def compiled() -> int:
        caches = getattr(tk._quantize_rows_kernel, "device_caches", None)
        if caches is None:
            pytest.skip("this triton keeps no device_caches to count compiles in")
        return sum(len(entry[0]) for entry in caches.values())

    counts = []
    for m in (40_000, 40_001, 40_016, 51_234):  # all large enough for the same tile rule
        fp8.quantize_rows(_rows((m, 1536), torch.bfloat16, "cuda"), backend="triton")
        counts.append(compiled())
    assert counts[1:] == counts[:1] * 3, f"compiled kernels after each row count: {counts}"


# ------------------------------------------------------------------------------------- Triton interpreter (CPU)
_INTERP_SCRIPT = r"""
import itertools, sys
sys.path.insert(0, sys.argv[1])  # this tests folder: the bounds live in one place
import torch
from test_kernels_fp8 import _rows, quant_failures
from trellis2.kernels.fp8 import triton as T
bad, n = [], 0
for dt, k, m, gelu in itertools.product((torch.float32, torch.bfloat16), (1, 7, 1536), (1, 3, 65), (False, True)):
    x = _rows((m, k), dt, seed=k)
    bm = None if m < 65 else 16  # 16-row tiles: the interpreter runs programs one by one; the last crosses the end
    bad += quant_failures(*T.quantize_rows(x, gelu=gelu, block_m=bm), x, gelu, f"interpreter {dt} [{m}, {k}] {gelu}")
    n += 1
# every e4m3 rounding boundary: in a row holding 448, inv = 1 and the codes are the values' own rounding
codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
mid = (codes[1:] + codes[:-1]) / 2
near = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1), codes])
row = torch.cat([torch.tensor([448.0]), near, -near, torch.linspace(-2**-5, 2**-5, 4001)])[None]
bad += quant_failures(*T.quantize_rows(row), row, what="e4m3 boundaries")
# layouts (leading dims, strided rows, a transposed view that is copied), empty, fp16, non-finite rows
wide = _rows((40, 96), torch.float16, seed=5)
for x in (wide[:, 7:40], wide[::3, :32], wide[:36].view(2, 18, 96)[:, :, 5:69], wide.t()[:20], wide[:, ::2],
          wide[0], wide[:0], torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), -2.0], [0.0, -0.0, 0.0]])):
    for gelu in (False, True):
        bad += quant_failures(*T.quantize_rows(x, gelu=gelu), x, gelu, f"layout {tuple(x.shape)} {x.stride()} {gelu}")
        n += 1
print("checked", n, "cases")
if bad:
    sys.exit("\n".join(bad[:20]))
"""


def test_triton_kernel_in_interpreter_matches_reference(tmp_path):
    """The Triton kernel runs on CPU in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported, hence a subprocess) against the reference: float32 and bfloat16 rows of 1, 7 and 1536 values, GELU or
    not, tiles crossing the last row, every e4m3 rounding boundary, strided and copied layouts, NaN/inf rows."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _INTERP_SCRIPT, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked" in proc.stdout
