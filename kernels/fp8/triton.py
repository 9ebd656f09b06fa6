"""Triton kernel of the FP8 row quantisation (the CUDA fast path); same function as ``reference.quantize_rows``.

Why: before each FP8 GEMM the activations are quantised per row. In torch that is a float32 copy, an abs, a
row max, a division, a multiply, a clamp and a cast: six or seven passes over [M, K] with float32 temporaries
(plus a GELU pass and its float32 copy before the MLP's second GEMM). This kernel reads each row once and writes
its codes (1 byte per value) and its scale once:

    h = x (or gelu_tanh(x)) in float32 ; amax = max |h| ; inv = div_rn(448, amax) ; q = e4m3(clamp(h * inv))

Exactness: the row max is exact, both divisions are IEEE (``div_rn``: ``/`` on fp32 compiles to an approximate
division), and the product is one float32 rounding, as in the reference. The e4m3 code is then built with
integer ops on the float32 bits (``_e4m3_code``) instead of ``.to(tl.float8e4nv)``: Triton's interpreter converts
fp32 -> e4m3 wrongly (it truncates subnormals, does not saturate and drops the exponent carry when a mantissa
rounds up, e.g. 124.2 -> 64), and float8e4nv casts do not compile for GPUs before sm_89. Codes are stored
through a uint8 view, so the kernel runs on any CUDA GPU. On sm_89+ GPUs (the ones with FP8 GEMMs) the kernel
converts with the hardware instruction instead (``cvt.rn.satfinite``: the same nearest-even, saturating rule):
fewer integer ops per value; the GPU tests hold both to the reference. Without GELU, codes and scales equal the reference's
bit for bit. With GELU the float32 tanh differs (libdevice ``tanhf`` on the GPU, as torch's CUDA GELU uses;
``1 - 2 / (exp(2y) + 1)`` in the interpreter, which has no libdevice; Sleef's in torch's CPU GELU) by a few
float32 ulps, so rare codes move to a neighbour and scales by a few ulps (bounds in tests/test_kernels_fp8.py).
Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .reference import AMAX_FLOOR, E4M3, E4M3_MAX, check_rows

MAX_K = 16384  # one row per tile row in registers; wider rows run on the reference (the DiTs use 1536 and 8192)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TOP = tl.constexpr(E4M3_MAX)  # jit functions may read module globals only as constexpr
_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _gelu_tanh(x, PRECISE: tl.constexpr):
    """torch's tanh GELU in float32, written as its CUDA kernel is: 0.5 x (1 + tanh(b (x + k x^3)))."""
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    if PRECISE:
        t = libdevice.tanh(inner)
    else:  # interpreter (no extern calls): exp saturates to 0 / inf at the ends, so t stays in [-1, 1]
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _e4m3_code(v):
    """float8_e4m3fn bit pattern (uint8) of float32 v rounded to nearest even, saturated at +-448 (the clamp:
    v = h * inv exceeds 448 by at most a float32 ulp); NaN -> 0x7F | sign. v must not be clamped before: the GPU's
    min/max drop NaN.
    Normal range (|v| >= 2^-6): round the 23-bit mantissa to 3 bits on the integer bits (a carry rolls into the
    exponent, as it should), then rebias the exponent (127 -> 7: (127 - 7) << 3 = 960 on the code's top bits).
    Subnormal range: adding 2^14, whose float32 ulp is the e4m3 subnormal step 2^-9, rounds |v| to a multiple of
    2^-9 (nearest even); subtracting it back is exact and the multiple times 512 is the code (2^-6 -> code 8)."""
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.minimum(tl.abs(v), _TOP)
    u = a.to(tl.uint32, bitcast=True)
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - 960
    sub = (((a + 16384.0) - 16384.0) * 512.0).to(tl.uint32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(v != v, 0x7F, code)
    return (code | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit(do_not_specialize=["M"])  # the token count changes with every shape: one compile for all of them
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, M, K, x_rs,
    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISE: tl.constexpr, HW_CVT: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_K] tile of rows; the row max is reduced along axis 1. q is contiguous [M, K] uint8."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_K)[None, :]
    mask = (rows < M) & (cols < K)
    h = tl.load(x_ptr + rows * x_rs + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        h = _gelu_tanh(h, PRECISE)  # gelu(0) = 0: the masked lanes stay out of the row max
    # the row max keeps NaN as torch's amax does (tl.max drops it: a separate flag; tl.reduce with a NaN-keeping
    # combine was 100x slower in the interpreter, which runs custom combines in Python)
    amax = tl.max(tl.abs(h), axis=1)[:, None]
    nan_row = tl.max((h != h).to(tl.int32), axis=1)[:, None] > 0
    amax = tl.where(nan_row, float("nan"), tl.maximum(amax, _FLOOR))
    top = tl.full(amax.shape, _TOP, tl.float32)
    inv = tl.math.div_rn(top, amax)
    v = h * inv
    if HW_CVT:  # sm_89+: cvt.rn.satfinite (nearest even, saturating at 448; NaN stays NaN): the same codes, fewer ops
        code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        code = _e4m3_code(v)
    tl.store(q_ptr + rows * K + cols, code, mask=mask)
    tl.store(s_ptr + rows, tl.math.div_rn(amax, top), mask=rows < M)


def _row_stride(t: torch.Tensor) -> int | None:
    """Stride between the rows of t viewed as [M, K], or None unless the last dim is contiguous and the leading
    dims collapse to one uniform row stride (size-1 dims are free)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    dims = [(n, s) for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1]
    for (_, s_out), (n_in, s_in) in zip(dims[:-1], dims[1:]):
        if s_out != s_in * n_in:
            return None
    return dims[-1][1] if dims else t.shape[-1]


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel takes x: float16/bfloat16/float32 [..., K], 1 <= K <= MAX_K. Any layout: rows that do
    not collapse to one stride are copied first (``quantize_rows``). The device is not checked here (the
    dispatcher sends only CUDA tensors; the tests run the CPU interpreter)."""
    return x.dtype in _DTYPES and x.dim() >= 1 and 1 <= x.shape[-1] <= MAX_K


def launch(k: int, m: int) -> tuple[int, int]:
    """(BLOCK_M rows per program, num_warps) for m rows of k values. A fixed rule, not autotuning: deterministic,
    CUDA-graph capturable from the first call and runnable in Triton's interpreter. It is kernels/dit_norm's
    ``residual_launch`` rule (tiles of ~4096 float32 values, 2-8 warps; H100: within ~10% of the best tile for
    a row kernel at K=1536), not re-tuned here: K=1536 takes 2 rows of 2048 lanes on 4 warps, K=8192 one row
    on 8 warps (32 values per thread). It keeps >= 2 programs per SM (132 SMs) when m allows."""
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(64, 4096 // block_k))
    while block_m > 1 and triton.cdiv(m, block_m) < 264:
        block_m //= 2
    return block_m, max(2, min(8, block_m * block_k // 1024))


def quantize_rows(x, *, gelu=False, block_m=None, num_warps=None):
    """See ``reference.quantize_rows``; call ``supports`` first. ``block_m`` / ``num_warps`` override ``launch``
    (tests and benchmarks); the result does not depend on them (each row is reduced by one program)."""
    check_rows(x)
    k = x.shape[-1]
    q = torch.empty(x.shape, device=x.device, dtype=E4M3)
    scale = torch.empty((*x.shape[:-1], 1), device=x.device, dtype=torch.float32)
    m = x.numel() // k
    if m == 0:
        return q, scale
    x_rs = _row_stride(x)
    if x_rs is None:  # e.g. a transposed view: one copy, then the row kernel
        x = x.contiguous()
        x_rs = k
    auto_m, auto_w = launch(k, m)
    block_m = auto_m if block_m is None else block_m
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x, q.view(torch.uint8), scale, m, k, x_rs,
        GELU=bool(gelu), BLOCK_M=block_m, BLOCK_K=triton.next_power_of_2(k), PRECISE=_PRECISE, HW_CVT=_hw_cvt(x.device),
        num_warps=auto_w if num_warps is None else num_warps,
    )  # fmt: skip
    return q, scale


def _hw_cvt(device: torch.device) -> bool:
    """Whether the kernel may convert with the GPU's own fp32 -> e4m3 instruction (compute capability >= 8.9)."""
    return _PRECISE and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# Under TRITON_INTERPRET=1 (set before triton is imported) @triton.jit returns an InterpretedFunction, which cannot
# call libdevice (extern functions): the interpreter takes the exp branch of _gelu_tanh.
_PRECISE = type(_quantize_rows_kernel).__name__ != "InterpretedFunction"
