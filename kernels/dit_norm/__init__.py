"""DiT block epilogues (residual + LayerNorm + AdaLN modulation; QK-RMSNorm + RoPE; the MLP's Linear + GELU),
backend chosen at call time.

``reference`` is plain torch (the CPU/MPS path, the float32 path and the ground truth); ``triton`` fuses each norm
epilogue into one kernel for CUDA tensors (same rounding points, see reference.py). The MLP's GELU has no Triton
kernel: its fused path is cuBLASLt's GEMM epilogue (``cublaslt.py``), which "auto" and "triton" both select.

Backend order (STYLE.md item 6), resolved on every call, never at import:
  1. the ``backend=`` argument;
  2. the innermost ``use_backend(...)`` context;
  3. the environment variable ``TRELLIS2_DIT_NORM_BACKEND`` (read at call time);
  4. "auto": triton for CUDA bf16/fp16 tensors when triton imports and the layout is one the kernel takes,
     else the reference (quietly). float32 stays on the reference in auto mode (the goldens' path).
Values: "auto", "torch" (alias "reference"), "triton". An explicit "triton" that cannot run (no triton, not CUDA,
a layout the kernel does not take) raises ``BackendUnavailableError`` saying what is missing.
"""

from __future__ import annotations

import torch

from .._backend import BACKENDS, BackendSwitch, BackendUnavailableError
from . import cublaslt, reference

ENV_VAR = "TRELLIS2_DIT_NORM_BACKEND"
_HALF = (torch.float16, torch.bfloat16)

_switch = BackendSwitch("DiT-norm", ENV_VAR, __name__)
use_backend = _switch.use
requested_backend = _switch.requested
_triton_module = _switch.triton_module


def _pick(x: torch.Tensor, backend: str | None, supported: str, *args, **kwargs):
    """The triton module if this call should run there, else None (reference)."""
    name = requested_backend(backend)
    if not _switch.triton_wanted(x, name, _HALF):
        return None
    mod = _triton_module(required=name == "triton")
    if mod is None:
        return None
    if not getattr(mod, supported)(x, *args, **kwargs):
        if name == "triton":
            raise BackendUnavailableError(
                f"DiT-norm backend 'triton' does not take this layout (x {tuple(x.shape)} strides {x.stride()} "
                f"{x.dtype}); choose backend 'auto' or 'torch'"
            )
        return None
    return mod


def residual_norm(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    norm: bool = True,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x + y*gate`` then ``LN(.)[*w+b][*(1+scale)+shift]``; see ``reference.residual_norm`` for shapes."""
    vecs = dict(weight=weight, bias=bias, shift=shift, scale=scale)
    mod = _pick(x, backend, "supported_residual_norm", y, gate, **vecs)
    impl = reference if mod is None else mod
    return impl.residual_norm(x, y, gate, norm=norm, eps=eps, **vecs)


def rms_norm_rope(
    x: torch.Tensor,
    gamma: torch.Tensor,
    phases: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-head RMSNorm (``F.normalize * gamma * sqrt(D)``) then optional RoPE; see ``reference.rms_norm_rope``."""
    mod = _pick(x, backend, "supported_rms_norm_rope", gamma, phases)
    impl = reference if mod is None else mod
    return impl.rms_norm_rope(x, gamma, phases, scale=scale)


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, backend: str | None = None
) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: x [..., K], weight [N, K], bias [N] -> [..., N] in x's dtype.

    Fused (the GELU in cuBLASLt's epilogue, ``cublaslt.py``) for CUDA bf16/fp16 tensors in "auto" mode and for any
    CUDA float tensors when "triton" is asked for; otherwise ``reference.linear_gelu``. An explicit "triton" that
    cannot run (not CUDA, mixed dtypes, no bias) raises ``BackendUnavailableError``."""
    name = requested_backend(backend)
    fused = name != "torch" and cublaslt.supported_linear_gelu(x, weight, bias)
    if name == "auto":
        fused = fused and x.dtype in _HALF
    elif name == "triton" and not fused:
        if x.device.type != "cuda":
            raise _switch.needs_cuda(x.device)
        raise BackendUnavailableError(
            f"DiT-norm backend 'triton' (cuBLASLt GELU epilogue) needs a bias and one float dtype for x, weight and "
            f"bias; got x {x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}; choose "
            f"backend 'auto' or 'torch'"
        )
    return cublaslt.linear_gelu(x, weight, bias) if fused else reference.linear_gelu(x, weight, bias)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "linear_gelu",
    "reference",
    "requested_backend",
    "residual_norm",
    "rms_norm_rope",
    "use_backend",
]
