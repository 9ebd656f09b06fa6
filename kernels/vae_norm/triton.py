"""Triton kernel of the SC-VAE blocks' norm (the CUDA fast path); same function as ``reference.layer_norm_32``.

Why: in the reference op sequence the full-size shape decoder spent ~60 of 210 ms (H100) in elementwise work,
most of it this norm: a float32 copy of the features, torch's float32 LayerNorm (slow at C = 64-256), the cast
back and, in the down/up blocks, a separate SiLU pass; four to five passes over [N, C] with two float32
temporaries. This kernel reads each row once and writes it once:

    h = round(LN(x) [* w] [+ b])        LN over the row in float32, rounded to x's dtype
    h = round(silu(h))                  optional, float32 SiLU of the rounded value

Rounding happens exactly where the reference rounds (``_round`` says how), so a half-precision result can differ
from the reference only where the float32 LayerNorm (summation order of the row statistics, rsqrt) lands on the
other side of a rounding boundary: by one ulp (a few ulps of a tiny result where the affine nearly cancels),
which SiLU can carry into its output; tests/test_kernels_vae_norm.py states and asserts the bounds (in Triton's
interpreter ~0.02-0.1% of fp16 values moved, by one ulp). Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .reference import check_out

MAX_C = 16384  # one row per tile row in registers; wider rows run on the reference (the decoders use 64-1024)


@triton.jit
def _round(x, RND: tl.constexpr):
    """float32 x rounded to nearest even at the precision of the output dtype, kept in float32 (RND 0 fp32:
    identity, 1 bf16, 2 fp16). With integer ops on the float32 bits, not casts: a ``.to(half).to(fp32)`` pair
    did not survive compilation in kernels/dit_norm (H100, triton 3.6: contracted into the next FMA), and
    Triton's CPU interpreter truncates fp32 -> bf16 casts. fp16 subnormals (|x| < 2^-14) are multiples of 2^-24:
    adding 0.75 (whose float32 ulp is 2^-24) rounds x to one, nearest even, and subtracting it back is exact.
    Values beyond the fp16 range stay finite here and become inf at the final cast (so SiLU of an LN output below
    -65504 gives -0 where torch gives NaN: out of reach of a LayerNorm with sane weights)."""
    if RND == 0:
        return x
    elif RND == 1:
        u = x.to(tl.uint32, bitcast=True)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        u = x.to(tl.uint32, bitcast=True)
        normal = ((u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(x) < 6.103515625e-05, (x + 0.75) - 0.75, normal)


@triton.jit(do_not_specialize=["M"])  # the row count changes with every shape: one compile for all of them
def _layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, M, C, x_rs, o_rs, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    RND: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_C] tile of rows; each row's statistics are reduced along axis 1. A program loads its
    whole tile before storing it, so ``o`` may be ``x`` itself (rows do not mix)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    cmask = cols < C
    mask = (rows < M) & cmask
    x = tl.load(x_ptr + rows * x_rs + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1)[:, None] / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=1)[:, None] / C
    h = d * tl.math.rsqrt(var + eps)
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=cmask, other=0.0)
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=cmask, other=0.0)
    h = _round(h, RND)
    if SILU:
        # torch's SiLU: x / (1 + exp(-x)) with expf and an IEEE division. libdevice's exp is that expf (tl.exp is
        # the approximate ex2 path); the interpreter has no libdevice and takes numpy's exp (PRECISE False).
        if PRECISE:
            e = libdevice.exp(-h)
        else:
            e = tl.exp(-h)
        h = _round(tl.math.div_rn(h, 1.0 + e), RND)
    tl.store(o_ptr + rows * o_rs + cols, h.to(o_ptr.dtype.element_ty), mask=mask)


_RND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(t: torch.Tensor) -> int:
    """Stride between the rows of t viewed as [M, C]; ValueError unless channels are contiguous and the leading
    dims collapse to one uniform row stride (size-1 dims are free)."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError("channels must be contiguous")
    dims = [(n, s) for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1]
    for (_, s_out), (n_in, s_in) in zip(dims[:-1], dims[1:]):
        if s_out != s_in * n_in:
            raise ValueError("leading dims do not collapse")
    return dims[-1][1] if dims else t.shape[-1]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) of the memory t addresses."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def supports(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> bool:
    """Whether the kernel takes these tensors (else the dispatcher runs the reference). It takes:

    x:   fp16 / bf16 / fp32 [..., C], 1 <= C <= MAX_C, channels contiguous, leading dims collapsing to one row
         stride (a contiguous tensor, a row slice of one, or [N, C] rows of a wider buffer);
    weight, bias: None or float32 [C] contiguous, on x's device;
    out: None, or x's shape and dtype with the same layout rules, and either exactly x (same address and row
         stride: in place) or memory disjoint from x's (a partial overlap would read rows already written).
    The device is not checked here (the dispatcher sends only CUDA tensors; the tests run the CPU interpreter).
    """
    try:
        if x.dtype not in _RND or x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_C:
            return False
        x_rs = _rows(x)
        for p in (weight, bias):
            if p is not None and (
                p.dtype != torch.float32 or p.shape != x.shape[-1:] or not p.is_contiguous() or p.device != x.device
            ):
                return False
        if out is None:
            return True
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            return False
        if x.numel() == 0:
            return True
        o_rs = _rows(out)
        if out.data_ptr() == x.data_ptr() and o_rs == x_rs:
            return True
        (x0, x1), (o0, o1) = _span(x), _span(out)
        return o1 <= x0 or x1 <= o0
    except ValueError:
        return False


def launch(c: int, m: int) -> tuple[int, int]:
    """(BLOCK_M rows per program, num_warps) for m rows of c channels. A fixed rule, not autotuning: deterministic,
    CUDA-graph capturable from the first call and runnable in Triton's interpreter. It is kernels/dit_norm's
    ``residual_launch`` rule (tiles of ~4096 float32 values, 4 warps at 4096; measured on an H100 within ~10% of
    the best tile at C=1536), not re-tuned for the VAE widths; it keeps >= 2 programs per SM (132 SMs) when m
    allows. At C=64 a program takes 64 rows."""
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(64, 4096 // block_c))
    while block_m > 1 and triton.cdiv(m, block_m) < 264:
        block_m //= 2
    return block_m, max(2, min(8, block_m * block_c // 1024))


def layer_norm_32(x, weight=None, bias=None, eps=1e-6, silu=False, out=None, *, block_m=None, num_warps=None):
    """See ``reference.layer_norm_32``; call ``supports`` first. A new result is contiguous. ``block_m`` /
    ``num_warps`` override ``launch`` (tests and benchmarks). Different tile shapes may sum a row's statistics
    in another order, so a rare value can move by an ulp between launches; one launch is deterministic."""
    check_out(x, out)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    c = x.shape[-1]
    m = x.numel() // c if c else 0
    if m == 0:
        return out
    auto_m, auto_w = launch(c, m)
    block_m = auto_m if block_m is None else block_m
    _layer_norm_kernel[(triton.cdiv(m, block_m),)](
        x, weight if weight is not None else x, bias if bias is not None else x, out,
        m, c, _rows(x), _rows(out), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu), BLOCK_M=block_m,
        BLOCK_C=triton.next_power_of_2(c), RND=_RND[x.dtype], PRECISE=_PRECISE,
        num_warps=auto_w if num_warps is None else num_warps,
    )  # fmt: skip
    return out


# Under TRITON_INTERPRET=1 (set before triton is imported) @triton.jit returns an InterpretedFunction, which cannot
# call libdevice (extern functions): the interpreter takes the tl.exp branch, numpy's exp.
_PRECISE = type(_layer_norm_kernel).__name__ != "InterpretedFunction"
