"""The SC-VAE blocks' norm: LayerNorm in float32, rounded to the feature dtype (+ optional SiLU), backend chosen at
call time.

``reference`` is plain torch (the CPU/MPS path, the float32 path and the ground truth); ``triton`` computes the
same function in one pass over the rows for CUDA tensors (same rounding points, see triton.py).

Backend order (STYLE.md item 6), resolved on every call, never at import:
  1. the ``backend=`` argument;
  2. the innermost ``use_backend(...)`` context;
  3. the environment variable ``TRELLIS2_VAE_NORM_BACKEND`` (read at call time);
  4. "auto": triton for CUDA fp16/bf16 tensors when triton imports and the kernel takes the layout
     (``triton.supports``), else the reference (quietly). float32 stays on the reference in auto mode, and so
     does a call that autograd records (grad enabled and x, weight or bias requiring grad: the kernel has no
     backward; the pipeline decodes under ``torch.no_grad()``).
Values: "auto", "torch" (alias "reference"), "triton". An explicit "triton" that cannot run (no triton, not CUDA,
a layout the kernel does not take) raises ``BackendUnavailableError`` saying what is missing.
"""

from __future__ import annotations

import torch

from .._backend import BACKENDS, BackendSwitch, BackendUnavailableError
from . import reference

ENV_VAR = "TRELLIS2_VAE_NORM_BACKEND"
_HALF = (torch.float16, torch.bfloat16)

_switch = BackendSwitch("VAE-norm", ENV_VAR, __name__)
use_backend = _switch.use
requested_backend = _switch.requested
_triton_module = _switch.triton_module


def fused_available(dtype: torch.dtype = torch.float16) -> bool:
    """Whether a call on contiguous CUDA features of ``dtype`` would run the fused kernel under the backend in force
    now (argument aside): for planners that budget the reference's float32 copies. Imports triton when it is asked."""
    if requested_backend(None) == "torch" or dtype not in _HALF:
        return False
    return _triton_module(required=False) is not None


def _pick(x: torch.Tensor, backend: str | None, weight, bias, out):
    """The triton module if this call should run there, else None (reference)."""
    name = requested_backend(backend)
    if not _switch.triton_wanted(x, name, _HALF):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        if name == "triton":  # the kernel has no backward: autograd would silently lose these gradients
            raise BackendUnavailableError(
                "VAE-norm backend 'triton' has no backward; run under torch.no_grad() (as the decoders do) or "
                "choose backend 'auto' / 'torch' where gradients are needed"
            )
        return None
    mod = _triton_module(required=name == "triton")
    if mod is None:
        return None
    if not mod.supports(x, weight, bias, out):
        if name == "triton":
            p = lambda t: None if t is None else f"{tuple(t.shape)} {t.dtype} {t.device}"  # noqa: E731
            raise BackendUnavailableError(
                f"VAE-norm backend 'triton' does not take these tensors (x {tuple(x.shape)} strides {x.stride()} "
                f"{x.dtype}; weight {p(weight)}; bias {p(bias)}; out {p(out)}): it needs contiguous channels, "
                f"1 <= C <= {mod.MAX_C}, float32 [C] weight/bias on x's device, and out either x itself or not "
                f"overlapping it; choose backend 'auto' or 'torch'"
            )
        return None
    return mod


def layer_norm_32(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu: bool = False,
    out: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``[silu](round(LN32(x) [* weight] [+ bias]))`` in x's dtype; see ``reference.layer_norm_32`` for the
    contract (x [..., C]; weight/bias float32 [C] or None; ``out`` may be x itself)."""
    reference.check_out(x, out)
    mod = _pick(x, backend, weight, bias, out)
    impl = reference if mod is None else mod
    return impl.layer_norm_32(x, weight, bias, eps, silu, out)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "fused_available",
    "layer_norm_32",
    "reference",
    "requested_backend",
    "use_backend",
]
