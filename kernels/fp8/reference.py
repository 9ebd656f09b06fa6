"""Plain-torch reference of the FP8 e4m3 row quantisation and the scaled GEMM (the CPU/MPS path and the definition).

The rule (one float32 scale per row, the largest |value| mapped to the largest finite e4m3 value):

    h     = x in float32                      (or gelu_tanh(x), computed in float32 from x's values)
    amax  = max |h| over the row, at least AMAX_FLOOR
    inv   = E4M3_MAX / amax                   one IEEE float32 division per row
    q     = e4m3(clamp(h * inv, +-E4M3_MAX))  float32 product, then round to nearest even (saturated by the clamp)
    scale = amax / E4M3_MAX                   so that x ~= q * scale

Both divisions are tensor / tensor on purpose: torch turns ``448.0 / t`` into ``t.reciprocal() * 448`` and, on
CUDA, ``t / 448.0`` into ``t * (1 / 448)``: two roundings each, which the Triton kernel (``div_rn``) would not
reproduce bit for bit.

Non-finite inputs (no checks are spent on them): a row holding a NaN gives NaN codes in every position and a NaN
scale (amax is NaN); a row holding +-inf (and no NaN) gives NaN codes where the infinities were, codes 0 elsewhere
(finite * 0) and an inf scale. Either way the row's GEMM output is NaN, as the unquantised GEMM's would be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value (0x7E); 0x7F is NaN (the "fn" format has no inf)
# amax floor: an all-zero row gets inv = 448e12 (finite), q = 0 and scale ~2.2e-15, never 0/0. Rows whose
# largest value is below 1e-12 are scaled as if it were 1e-12 (their values land among the subnormal codes).
AMAX_FLOOR = 1e-12
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_rows(x: torch.Tensor, what: str = "quantize_rows") -> None:
    """Raise unless x is a [..., K] float16/bfloat16/float32 tensor with K >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{what}: x must be float16, bfloat16 or float32; got {x.dtype}. Cast it first (x.float())")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{what}: x must be [..., K] with K >= 1; got shape {tuple(x.shape)}")


def quantize_rows(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of x to float8 e4m3 with one float32 scale (module docstring).

    x:    [..., K] float16/bfloat16/float32, any layout.
    gelu: quantise gelu_tanh(x) (``F.gelu(x.float(), approximate="tanh")``) instead of x.
    ->    (q [..., K] float8_e4m3fn contiguous, scale [..., 1] float32 contiguous), x ~= q.float() * scale with
          |error| <= half an e4m3 step of |x| / scale: relative 2^-4 for |x| >= 2^-6 * scale, absolute
          2^-10 * scale below (the subnormal codes).
    """
    check_rows(x)
    h = F.gelu(x.float(), approximate="tanh") if gelu else x.float()
    amax = h.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    top = torch.full_like(amax, E4M3_MAX)
    inv = top / amax
    q = (h * inv).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # the cast rounds to nearest even; out of range would be NaN
    return q.contiguous(), amax / top


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule per output row of a Linear weight (runs once at load time, plain torch on w's device).

    w:  [N, K] float16/bfloat16/float32.
    -> (q [N, K] float8_e4m3fn contiguous, scale [N] float32), w ~= q.float() * scale[:, None].
    """
    check_rows(w, "quantize_weight")
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: w must be a Linear weight [N, K]; got shape {tuple(w.shape)}")
    q, scale = quantize_rows(w)
    return q, scale.view(-1)


def check_linear(q, scale, wq, wscale, bias, out_dtype) -> None:
    """Raise ValueError/TypeError naming the argument unless the operands of ``scaled_linear`` fit together."""

    def desc(t):
        return f"{t.dtype} {tuple(t.shape)} on {t.device}"

    if q.dtype != E4M3 or q.dim() < 1:
        raise TypeError(f"scaled_linear: q must be float8_e4m3fn [..., K] (from quantize_rows); got {desc(q)}")
    k = q.shape[-1]
    if wq.dtype != E4M3 or wq.dim() != 2 or wq.shape[1] != k:
        raise ValueError(f"scaled_linear: wq must be float8_e4m3fn [N, {k}] (from quantize_weight); got {desc(wq)}")
    n = wq.shape[0]
    if scale.dtype != torch.float32 or scale.shape != (*q.shape[:-1], 1):
        raise ValueError(f"scaled_linear: scale must be float32 {(*q.shape[:-1], 1)} (q's rows); got {desc(scale)}")
    if wscale.dtype != torch.float32 or wscale.shape != (n,):
        raise ValueError(f"scaled_linear: wscale must be float32 [{n}] (one per output channel); got {desc(wscale)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (n,)):
        raise ValueError(f"scaled_linear: bias must be None or a float tensor [{n}]; got {desc(bias)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"scaled_linear: out_dtype must be one of {list(_OUT_DTYPES)}; got {out_dtype!r}")
    for name, t in (("scale", scale), ("wq", wq), ("wscale", wscale), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"scaled_linear: {name} is on {t.device} but q is on {q.device}; move them together")


def scaled_linear(q, scale, wq, wscale, bias=None, *, out_dtype: torch.dtype) -> torch.Tensor:
    """The exact emulation of the scaled GEMM: dequantised operands in float32, a float32 GEMM, one rounding.

    q [..., K] float8_e4m3fn, scale [..., 1] float32 (``quantize_rows``); wq [N, K] float8_e4m3fn, wscale [N]
    float32 (``quantize_weight``); bias None or [N] of any float dtype (added in float32).
    -> [..., N] in out_dtype: ``((q * scale) @ (wq * wscale[:, None]).T + bias)`` rounded once to out_dtype.
    """
    a = q.float() * scale  # [..., K]
    w = wq.float() * wscale[:, None]  # [N, K]
    y = a.reshape(-1, a.shape[-1]) @ w.T  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*q.shape[:-1], wq.shape[0])


__all__ = ["AMAX_FLOOR", "E4M3", "E4M3_MAX", "quantize_rows", "quantize_weight", "scaled_linear"]
