"""Triton kernels of the DiT norm epilogues (the CUDA fast path); same functions as ``reference.py``.

Why: in the reference op sequence each block spends ~50 small elementwise/cast/reduce launches per forward on
LayerNorm (fp32 copy, norm, cast back), modulation (``1 + scale``, multiply, add), gated residuals and the
QK-RMSNorm + RoPE (fp32 copies, norm, divide, gamma, complex multiply, casts). Each kernel here reads its
inputs once and writes its outputs once; a program takes a tile of several rows (``residual_launch`` /
``rope_launch`` pick its size by a fixed rule, see there) so that enough bytes are in flight to run near HBM
bandwidth:

``residual_norm``  x_new = x + y*gate ; h = LN(x_new) [* w + b] ; h = h*(1+scale) + shift
``rms_norm_rope``  h = normalize(x[head]) * gamma * sqrt(D) ; h = rotate(h, phase[token]) (interleaved pairs)

Rounding: every place where the reference rounds to the activation dtype (after ``y*gate``, after the add,
after the fp32 LayerNorm, after ``1+scale``, after the product, after the shift; after the RMSNorm, after the
RoPE) rounds here too (``_round`` says why with integer ops), so half-precision results match the reference to
the last bit except where the fp32 reductions (LN mean/variance, the head norm) differ in summation order:
measured on an H100 at [2, 4096, 1536], 0.00% (bf16) and 0.01-0.02% (fp16) of the values differ, by one ulp.
Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, RND: tl.constexpr, BITS: tl.constexpr):
    """float32 x rounded (nearest even) to the activation dtype and widened back: RND 0 fp32 (identity), 1 bf16,
    2 fp16. BITS does it with integer ops on the float32 bits. Why: with plain casts, a ``.to(bf16).to(fp32)``
    pair between a multiply and the following add did not survive compilation (H100, triton 3.6): the pair
    became one FMA and 23-26% of the outputs of ``h*(1+s)+t`` and ``x+y*g`` were one ulp off the reference
    (bench/dit_fused.py --diag; 0.00% with BITS). For fp16 the bit rounding is exact for normal fp16 values
    (|x| >= 2^-14); smaller intermediates keep extra bits (error < 6e-8); the stored result is a true fp16."""
    if RND == 0:
        return x
    elif BITS:
        u = x.to(tl.uint32, bitcast=True)
        if RND == 1:
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        else:
            u = (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000
        return u.to(tl.float32, bitcast=True)
    elif RND == 1:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x.to(tl.float16).to(tl.float32)


# Counts only: one compile for every token count. The rows-per-item arguments are the item length L of dense [B, L, C]
# tokens: specialised, every L not divisible by 16 compiled every variant again (~1.7 s on the first 512 run, H100).
@triton.jit(do_not_specialize=["M", "g_rpi", "sh_rpi", "sc_rpi"])
def _residual_norm_kernel(
    x_ptr, y_ptr, g_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr, xo_ptr, ho_ptr,
    M, C, x_rs, y_rs, xo_rs, ho_rs,
    g_rpi, g_is, sh_rpi, sh_is, sc_rpi, sc_is,
    eps,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, WRITE_X: tl.constexpr, NORM: tl.constexpr,
    AFFINE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RND: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_C] tile of rows; every reduction is along axis 1 (one row each)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    cmask = cols < C
    mask = (rows < M) & cmask
    x = tl.load(x_ptr + rows * x_rs + cols, mask=mask, other=0.0)
    dt = x.dtype
    if HAS_Y:
        y = tl.load(y_ptr + rows * y_rs + cols, mask=mask, other=0.0)
        if HAS_GATE:
            g = tl.load(g_ptr + (rows // g_rpi) * g_is + cols, mask=mask, other=0.0)
            y = _round(y.to(tl.float32) * g.to(tl.float32), RND, BITS)
        x = _round(x.to(tl.float32) + y.to(tl.float32), RND, BITS).to(dt)
        if WRITE_X:
            tl.store(xo_ptr + rows * xo_rs + cols, x, mask=mask)
    if NORM:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1)[:, None] / C
        d = tl.where(mask, xf - mean, 0.0)
        var = tl.sum(d * d, axis=1)[:, None] / C
        h = d * tl.math.rsqrt(var + eps)
        if AFFINE:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
            h = h * w + b
        h = _round(h, RND, BITS)
        if HAS_SCALE:
            s = tl.load(sc_ptr + (rows // sc_rpi) * sc_is + cols, mask=mask, other=0.0).to(tl.float32)
            h = _round(h * _round(1.0 + s, RND, BITS), RND, BITS)
        if HAS_SHIFT:
            t = tl.load(sh_ptr + (rows // sh_rpi) * sh_is + cols, mask=mask, other=0.0).to(tl.float32)
            h = _round(h + t, RND, BITS)
        tl.store(ho_ptr + rows * ho_rs + cols, h.to(dt), mask=mask)


def _row_stride(t: torch.Tensor, trailing: int) -> int:
    """Stride between rows of t viewed as [M, *t.shape[-trailing:]]; raises ValueError if the leading dims do not
    collapse to one uniform stride (size-1 dims are free)."""
    dims = [(n, s) for n, s in zip(t.shape[:-trailing], t.stride()[:-trailing]) if n > 1]
    for (_, s_out), (n_in, s_in) in zip(dims[:-1], dims[1:]):
        if s_out != s_in * n_in:
            raise ValueError("leading dims do not collapse")
    return dims[-1][1] if dims else t.shape[-trailing:].numel()


def _rows(t: torch.Tensor) -> int:
    """Row stride of t viewed as [M, C] (last dim contiguous)."""
    if t.stride(-1) != 1:
        raise ValueError("last dim must be contiguous")
    return _row_stride(t, 1)


def _vector(v: torch.Tensor | None, x: torch.Tensor) -> tuple[int, int]:
    """(rows per item, item stride) of a broadcast vector: [B, 1, C] against x [B, L, C], or [M, C] per row."""
    if v is None:
        return 1, 0
    if v.stride(-1) != 1 or v.shape[-1] != x.shape[-1]:
        raise ValueError("vector must be [..., C] with contiguous channels")
    if v.dim() == x.dim() == 3 and v.shape[1] == 1 and v.shape[0] in (1, x.shape[0]):
        return x.shape[1], (v.stride(0) if v.shape[0] > 1 else 0)
    if v.dim() == 2 and x.dim() == 2 and v.shape[0] == x.shape[0]:
        return 1, v.stride(0)
    raise ValueError(f"unsupported broadcast {tuple(v.shape)} against {tuple(x.shape)}")


def supported_residual_norm(x, y=None, gate=None, *, weight=None, bias=None, shift=None, scale=None) -> bool:
    """Whether the kernel takes these layouts (else the dispatcher runs the reference)."""
    try:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() not in (2, 3):
            return False
        for t in (x, y):
            if t is not None:
                _rows(t)
        if y is not None and (y.shape != x.shape or y.dtype != x.dtype):
            return False
        for v in (gate, shift, scale):
            if v is not None and v.dtype != x.dtype:
                return False
            _vector(v, x)
        if (weight is None) != (bias is None):
            return False
        for p in (weight, bias):
            if p is not None and (p.dtype != torch.float32 or p.shape != x.shape[-1:] or not p.is_contiguous()):
                return False
        return x.shape[-1] <= 16384
    except ValueError:
        return False


ROUND_BITS = True  # see _round; False = plain dtype casts (only for bench/dit_fused.py --diag)
_RND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def residual_launch(c: int, m: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of ``_residual_norm_kernel`` for m rows of c channels (dtype: kept for the rule's
    signature; the registers hold fp32 either way). A fixed rule, not autotuning, so the launch is deterministic
    and CUDA-graph capturable from the first call. Why these numbers (bench/dit_norm_tune.py, H100, bf16,
    C=1536, M 2984-28240): tiles of ~4096 fp32 values on 4 warps (2 rows of 2048; 32 values per thread and
    tensor) were within ~10% of the best of BLOCK_M 1-16 x 2-8 warps in every case (cases b-d at 90-100% of a
    torch copy's bandwidth from 8k rows on); bigger tiles lose (register pressure, longer reductions), e.g. 4 rows
    x 8 warps was 20-30% slower on the modulated cases. The former one-row launch (1 x 4 warps) measured about
    the same as this rule at C=1536 (0.94-1.08x): the row kernel was not the slow one. The grid keeps
    >= 2 programs per SM (132 SMs) when M allows. C is padded to a power of two (1536 -> 2048): the masked lanes
    issue no memory traffic but do execute the ALU work, which shows where the integer rounding dominates (the
    shift+scale-only case runs at ~2/3 of copy bandwidth; the others at 80-100%)."""
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(64, 4096 // block_c))
    while block_m > 1 and triton.cdiv(m, block_m) < 264:
        block_m //= 2
    return block_m, max(2, min(8, block_m * block_c // 1024))


def residual_norm(
    x, y=None, gate=None, *, norm=True, weight=None, bias=None, shift=None, scale=None, eps=1e-6,
    block_m=None, num_warps=None,
):  # fmt: skip
    """See ``reference.residual_norm``; call ``supported_residual_norm`` first. ``block_m``/``num_warps``
    override ``residual_launch`` (for bench/dit_norm_tune.py). Different launches may sum the fp32 LN
    statistics in a different order (the reduction follows the tile layout), so a rare value can move by an
    ulp between launches; one launch is always deterministic."""
    c = x.shape[-1]
    m = x.numel() // c
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype) if norm else None
    x_new = torch.empty(x.shape, device=x.device, dtype=x.dtype) if y is not None else x
    if m == 0:
        return x_new, h
    (g_rpi, g_is), (sh_rpi, sh_is), (sc_rpi, sc_is) = (_vector(v, x) for v in (gate, shift, scale))
    auto_m, auto_w = residual_launch(c, m, x.dtype)
    block_m = auto_m if block_m is None else block_m
    dummy = x
    _residual_norm_kernel[(triton.cdiv(m, block_m),)](
        x, y if y is not None else dummy, gate if gate is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        x_new, h if h is not None else dummy,
        m, c, _rows(x), _rows(y) if y is not None else 0, c, c,
        g_rpi, g_is, sh_rpi, sh_is, sc_rpi, sc_is, float(eps),
        HAS_Y=y is not None, HAS_GATE=gate is not None, WRITE_X=y is not None, NORM=norm,
        AFFINE=weight is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        BLOCK_M=block_m, BLOCK_C=triton.next_power_of_2(c), RND=_RND[x.dtype], BITS=ROUND_BITS,
        num_warps=auto_w if num_warps is None else num_warps,
    )  # fmt: skip
    return x_new, h


@triton.jit(do_not_specialize=["R", "P"])  # counts only: one compile for every token count
def _rms_norm_rope_kernel(
    x_ptr, g_ptr, p_ptr, o_ptr, R, H, D, x_rs, P, scale,
    ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RND: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """BLOCK_R (token, head) rows of D contiguous values per program. Why rows of heads rather than tokens:
    12 heads would pad to 16 (25% idle lanes); head rows tile without padding. Each row is loaded with one
    contiguous (vectorised) load and split into its (even, odd) pairs in registers. H100, bf16, q of qkv
    [M, 3, 12, 128]: 4.1-6.6x faster than the former one-token-per-program kernel with stride-2 loads (e.g.
    340 -> 84 us at 28240 tokens, 77-94% of a torch copy's bandwidth)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    tok = r // H
    head = r - tok * H
    dd = tl.arange(0, BLOCK_D)[None, :]
    mask = (r < R) & (dd < D)
    x = tl.load(x_ptr + tok * x_rs + head * D + dd, mask=mask, other=0.0)
    dt = x.dtype
    g = tl.load(g_ptr + head * D + dd, mask=mask, other=0.0)
    xe, xo = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_R, BLOCK_D // 2, 2]))
    ge, go = tl.split(tl.reshape(g, [BLOCK_R, BLOCK_D // 2, 2]))
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(xe * xe + xo * xo, axis=1)), 1e-12)[:, None]
    he = tl.math.div_rn(xe, nrm) * ge * scale
    ho = tl.math.div_rn(xo, nrm) * go * scale
    if ROPE:
        p = tl.load(p_ptr + (tok % P) * D + dd, mask=mask, other=0.0)
        c, s = tl.split(tl.reshape(p, [BLOCK_R, BLOCK_D // 2, 2]))
        a, b = _round(he, RND, BITS), _round(ho, RND, BITS)  # the rotation starts from the rounded norm
        he = a * c - b * s
        ho = a * s + b * c
    # rounded with _round before the (then exact) cast: same value as a nearest-even cast on the GPU, and the
    # Triton interpreter (tests) truncates fp32 -> bf16 casts
    out = _round(tl.reshape(tl.join(he, ho), [BLOCK_R, BLOCK_D]), RND, BITS).to(dt)
    tl.store(o_ptr + r * D + dd, out, mask=mask)


def supported_rms_norm_rope(x, gamma, phases=None) -> bool:
    try:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() < 3 or x.shape[-1] % 2:
            return False
        h, d = x.shape[-2:]
        if x.stride(-1) != 1 or x.stride(-2) != d:
            return False
        lead = x.shape[:-2]
        _row_stride(x, 2)
        if gamma.dtype != torch.float32 or gamma.shape != (h, d) or not gamma.is_contiguous():
            return False
        if phases is not None:
            if phases.dtype != torch.complex64 or not phases.is_contiguous() or phases.shape[-1] != d // 2:
                return False
            pl = phases.shape[:-1]
            if len(pl) > len(lead) or tuple(lead[len(lead) - len(pl) :]) != tuple(pl):
                return False
        return h * d <= 65536
    except (ValueError, RuntimeError):
        return False


def rope_launch(h: int, d: int, m: int) -> tuple[int, int]:
    """(BLOCK_R head rows, num_warps) of ``_rms_norm_rope_kernel`` for m tokens of h heads of d values. Fixed
    rule (deterministic, graph-capturable). Why: ~2048 values per program on 4 warps (16 heads of 128, 16
    values per thread) was within ~4% of the best BLOCK_R 8-128 x 2-8 warps at H=12, D=128 (H100 sweep,
    bench/dit_norm_tune.py); 64 x 8 warps was 20-40% slower."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(256, 2048 // block_d))
    while block_r > 1 and triton.cdiv(m * h, block_r) < 264:
        block_r //= 2
    return block_r, max(2, min(8, block_r * block_d // 512))


def rms_norm_rope(x, gamma, phases=None, *, scale=None, block_r=None, num_warps=None):
    """See ``reference.rms_norm_rope``; call ``supported_rms_norm_rope`` first. Output is contiguous.
    ``block_r``/``num_warps`` override ``rope_launch`` (for bench/dit_norm_tune.py)."""
    h, d = x.shape[-2:]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    m = x.numel() // (h * d)
    if m == 0:
        return out
    x_rs = _row_stride(x, 2)
    p = torch.view_as_real(phases) if phases is not None else gamma
    n_p = phases.numel() // (d // 2) if phases is not None else 1
    auto_r, auto_w = rope_launch(h, d, m)
    block_r = auto_r if block_r is None else block_r
    _rms_norm_rope_kernel[(triton.cdiv(m * h, block_r),)](
        x, gamma, p, out, m * h, h, d, x_rs, n_p, float(d**0.5 if scale is None else scale),
        ROPE=phases is not None, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d), RND=_RND[x.dtype],
        BITS=ROUND_BITS, num_warps=auto_w if num_warps is None else num_warps,
    )  # fmt: skip
    return out
