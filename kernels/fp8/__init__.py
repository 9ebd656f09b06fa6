"""FP8 e4m3 row quantisation and the row-wise scaled GEMM of the opt-in FP8 DiT Linear layers, backend chosen at
call time.

Layout: ``reference.py`` is the definition in plain torch (the CPU/MPS path and the ground truth: the quantisation
rule, the weight quantiser, the exact float32 emulation of the GEMM); ``triton.py`` quantises rows in one pass on
CUDA (bit-identical to the reference without GELU); ``scaled_mm.py`` holds the CUDA GEMM paths, which are not
Triton: ``torch._scaled_mm`` with row-wise scales on GPUs with FP8 matrix units, and a dequantising ``F.linear``
fallback elsewhere.

Backend order (STYLE.md item 6), resolved on every call, never at import:
  1. the ``backend=`` argument;
  2. the innermost ``use_backend(...)`` context;
  3. the environment variable ``TRELLIS2_FP8_BACKEND`` (read at call time);
  4. "auto" (quietly falling back):
     ``quantize_rows``: the Triton kernel for CUDA tensors of all three input dtypes (float32 included: the
     kernel rounds at the reference's points, so there is no precision reason to keep it on the reference) when
     triton imports and K <= triton.MAX_K; else the reference.
     ``scaled_linear``: on CUDA, ``torch._scaled_mm`` when ``fp8_matmul_supported``, out_dtype is bfloat16 and
     K, N are multiples of 16, else the dequantising fallback (a rounding-level variant of the reference, see
     scaled_mm.py); on CPU/MPS the reference.
Values: "auto", "torch" (alias "reference": the reference everywhere, also on CUDA), "triton" (the fast paths:
the Triton kernel and ``torch._scaled_mm``). An explicit "triton" that cannot run raises
``BackendUnavailableError`` naming what is missing (triton, CUDA, the GPU, the dtype or sizes).

Inference only: no path has a backward (the cast to float8 ends any gradient).
"""

from __future__ import annotations

import torch

from .._backend import BACKENDS, BackendSwitch, BackendUnavailableError
from . import reference, scaled_mm
from .reference import E4M3, E4M3_MAX, quantize_weight
from .scaled_mm import fp8_matmul_supported

ENV_VAR = "TRELLIS2_FP8_BACKEND"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_switch = BackendSwitch("FP8", ENV_VAR, __name__)
use_backend = _switch.use
requested_backend = _switch.requested
_triton_module = _switch.triton_module


def _pick(x: torch.Tensor, backend: str | None):
    """The triton module if this ``quantize_rows`` call should run there, else None (reference)."""
    name = requested_backend(backend)
    if not _switch.triton_wanted(x, name, _DTYPES):
        return None
    mod = _triton_module(required=name == "triton")
    if mod is None:
        return None
    if not mod.supports(x):
        if name == "triton":
            raise BackendUnavailableError(
                f"FP8 backend 'triton' quantises rows of 1 to {mod.MAX_K} values; got x {tuple(x.shape)} {x.dtype}. "
                f"Choose backend 'auto' or 'torch'"
            )
        return None
    return mod


def quantize_rows(
    x: torch.Tensor, *, gelu: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float16/bfloat16/float32 (any layout: rows that do not collapse to one stride with a contiguous
    last dim are copied first) -> (q [..., K] float8_e4m3fn contiguous, scale [..., 1] float32) with
    x ~= q.float() * scale. ``gelu=True`` quantises gelu_tanh(x) (computed in float32 from x's values) instead.
    The rule, its error bound and what NaN/inf do: ``reference.quantize_rows``."""
    reference.check_rows(x)
    mod = _pick(x, backend)
    impl = reference if mod is None else mod
    return impl.quantize_rows(x, gelu=gelu)


def scaled_linear(
    q: torch.Tensor,
    scale: torch.Tensor,
    wq: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype,
    backend: str | None = None,
) -> torch.Tensor:
    """(q [..., K] e4m3, scale [..., 1] fp32) @ (wq [N, K] e4m3, wscale [N] fp32).T + bias [N] (any float dtype or
    None) -> [..., N] in out_dtype (float16/bfloat16/float32). ``reference.scaled_linear`` is the definition; the
    CUDA paths (module docstring, scaled_mm.py) agree with it to the output dtype's rounding."""
    reference.check_linear(q, scale, wq, wscale, bias, out_dtype)
    name = requested_backend(backend)
    if name == "torch":
        return reference.scaled_linear(q, scale, wq, wscale, bias, out_dtype=out_dtype)
    missing = scaled_mm.missing(q, scale, wq, wscale, bias, out_dtype)
    if missing is None:
        return scaled_mm.scaled_linear(q, scale, wq, wscale, bias)
    if name == "triton":
        if q.device.type != "cuda":
            raise _switch.needs_cuda(q.device)
        raise BackendUnavailableError(
            f"FP8 backend 'triton' (torch._scaled_mm) needs {missing}; choose backend 'auto' (dequantised GEMM) or "
            f"'torch'"
        )
    if q.device.type == "cuda":
        return scaled_mm.dequantized_linear(q, scale, wq, wscale, bias, out_dtype)
    return reference.scaled_linear(q, scale, wq, wscale, bias, out_dtype=out_dtype)


__all__ = [
    "BACKENDS",
    "E4M3",
    "E4M3_MAX",
    "ENV_VAR",
    "BackendUnavailableError",
    "fp8_matmul_supported",
    "quantize_rows",
    "quantize_weight",
    "reference",
    "requested_backend",
    "scaled_linear",
    "use_backend",
]
