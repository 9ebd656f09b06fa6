"""The CUDA paths of ``scaled_linear``: ``torch._scaled_mm`` with row-wise scales, and its dequantising fallback.

No Triton here: the FP8 GEMM is torch's (CUTLASS row-wise kernels for sm_89, sm_9x, sm_10x and later in recent
torch builds). With row-wise scaling it takes e4m3 ``mat1`` [M, K] row-major and ``mat2`` [K, N] column-major
(``wq.t()`` of a contiguous [N, K] weight), float32 scales [M, 1] and [1, N], an optional bfloat16 bias [N], and
writes bfloat16 only; K and N must be multiples of 16. It accumulates in float32 and applies the scales and bias
to the accumulator, so it differs from the reference emulation by the bias's rounding to bfloat16 and the
summation order: a bfloat16 rounding-level difference. Whether it exists depends on the GPU and the torch build
(Linux CUDA >= 12 builds only; Windows leaves it out, NVIDIA/cutlass#1571): ``fp8_matmul_supported`` checks.

``dequantized_linear`` is "auto"'s CUDA fallback where the fast path cannot run (older GPUs, fp16/fp32 output,
K or N not multiples of 16, Windows): operands dequantised and rounded to out_dtype, then ``F.linear``. It
rounds each operand once more than the reference (relative 2^-9 for bf16, 2^-12 for fp16) and cuBLAS may sum
in a different order (and in reduced precision for fp16), so it is a rounding-level variant of the reference,
but it runs at half-precision GEMM speed instead of the reference's float32 one.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

_log = logging.getLogger(__name__)


def fp8_matmul_supported(device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs on ``device`` (a torch.device, "cuda", "cuda:1"): a
    CUDA GPU of compute capability >= (8, 9) (RTX 40xx, L4/L40, H100 and later) on a torch build that has the
    row-wise kernels. The build is checked once per GPU by a 16 x 16 probe GEMM (cached) rather than from
    version numbers: older torch releases lack row-wise scaling or lack it for some architectures, and the
    Windows build leaves the kernels out. The probe only launches work (an unsupported GPU or build fails on the
    host, before any launch), so a first call inside CUDA-graph capture is safe; it adds three tiny kernels."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _supported(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    if torch.version.hip is None and torch.cuda.get_device_capability(index) < (8, 9):
        return False
    device = torch.device("cuda", index)
    a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    s = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.view(1, 16), bias=s.view(16).to(torch.bfloat16),
                         out_dtype=torch.bfloat16)  # fmt: skip
    except (RuntimeError, TypeError) as exc:  # TORCH_CHECK (unsupported GPU/build); TypeError: no such argument
        _log.info("FP8 GEMMs emulated on %s: torch._scaled_mm with row-wise scales is unavailable (%s)", device, exc)
        return False
    return True


def missing(q, scale, wq, wscale, bias, out_dtype) -> str | None:
    """None when ``scaled_linear`` (this module's fast path) takes these operands, else what is missing, as words
    for an error message. Operands already passed ``reference.check_linear``."""
    if q.device.type != "cuda":
        return f"CUDA tensors (got tensors on '{q.device}')"
    if not fp8_matmul_supported(q.device):
        cap = torch.cuda.get_device_capability(q.device)
        return (f"a GPU of compute capability >= 8.9 and a torch build with row-wise torch._scaled_mm (got "
                f"{cap[0]}.{cap[1]}, torch {torch.__version__})")  # fmt: skip
    if out_dtype != torch.bfloat16:
        return f"out_dtype torch.bfloat16 (torch._scaled_mm's row-wise scaling writes bfloat16 only; got {out_dtype})"
    k, n = q.shape[-1], wq.shape[0]
    if k % 16 or n % 16:
        return f"K and N multiples of 16 (got K={k}, N={n})"
    if not wq.is_contiguous():
        return f"a contiguous weight wq [N, K] (got strides {wq.stride()})"
    return None


def scaled_linear(q, scale, wq, wscale, bias, out_dtype=torch.bfloat16) -> torch.Tensor:
    """(q [..., K] e4m3, scale [..., 1] fp32) @ (wq [N, K] e4m3, wscale [N] fp32).T + bias [N] -> [..., N] bfloat16,
    one ``torch._scaled_mm``; call ``missing`` first. M = 0 returns an empty result without a launch (cuBLAS/CUTLASS
    reject empty operands). Rows are made contiguous if they are not (one copy of q)."""
    k, n = q.shape[-1], wq.shape[0]
    lead = q.shape[:-1]
    m = q.numel() // k
    if m == 0:
        return torch.empty(*lead, n, device=q.device, dtype=torch.bfloat16)
    out = torch._scaled_mm(
        q.reshape(m, k).contiguous(),
        wq.t(),
        scale_a=scale.reshape(m, 1).contiguous(),
        scale_b=wscale.reshape(1, n).contiguous(),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )
    return out.view(*lead, n)


def dequantized_linear(q, scale, wq, wscale, bias, out_dtype) -> torch.Tensor:
    """The same GEMM from operands dequantised to out_dtype (module docstring): [..., N] in out_dtype."""
    a = (q.float() * scale).to(out_dtype)
    w = (wq.float() * wscale[:, None]).to(out_dtype)
    return F.linear(a, w, None if bias is None else bias.to(out_dtype))


__all__ = ["dequantized_linear", "fp8_matmul_supported", "missing", "scaled_linear"]
