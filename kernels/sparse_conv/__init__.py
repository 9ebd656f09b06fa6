"""Submanifold 3x3x3 sparse convolution (the only conv of the SC-VAEs), with its backend chosen at call time.

``reference`` is plain torch (the CPU/MPS path and the ground truth); ``triton`` is the CUDA implicit-GEMM kernel.
Both share the neighbour-map contract of ``reference.build_neighbours``.

Backend order (STYLE.md item 6), resolved on every call, never at import:
  1. the ``backend=`` argument of ``submanifold_conv3d``;
  2. the innermost ``use_backend(...)`` context;
  3. the environment variable ``TRELLIS2_SPCONV_BACKEND`` (read at call time);
  4. "auto": triton for CUDA tensors when triton imports, else the reference (quietly).
Values: "auto", "torch" (alias "reference"), "triton". An explicit "triton" that cannot run raises
``BackendUnavailableError`` naming what is missing (triton not installed, tensors not on CUDA).
"""

from __future__ import annotations

import torch

from .._backend import BACKENDS, BackendSwitch, BackendUnavailableError
from . import reference
from .reference import build_neighbours

ENV_VAR = "TRELLIS2_SPCONV_BACKEND"

_switch = BackendSwitch("sparse-conv", ENV_VAR, __name__)
use_backend = _switch.use
requested_backend = _switch.requested
_triton_module = _switch.triton_module


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on ``device`` will run: "torch" or "triton". Raises if an explicit triton cannot run."""
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    if name == "triton":
        if device.type != "cuda":
            raise _switch.needs_cuda(device)
        _triton_module(required=True)
        return "triton"
    if device.type == "cuda" and _triton_module(required=False) is not None:
        return "triton"
    return "torch"


def submanifold_conv3d(
    feats: torch.Tensor,
    neighbours: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    chunk_rows: int | None = None,
    max_bytes: int = reference.DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Submanifold 3x3x3 convolution; see ``reference.submanifold_conv3d`` for shapes and semantics.

    backend: "auto" / "torch" / "triton" / None (= context, then env var, then auto).
    chunk_rows, max_bytes: only the torch backend materialises a gathered block; they bound its size (memory).
    The triton backend holds no temporary beyond the [N, Co] output.
    """
    if resolve_backend(feats.device, backend) == "triton":
        return _triton_module(required=True).submanifold_conv3d(feats, neighbours, weight, bias)
    return reference.submanifold_conv3d(feats, neighbours, weight, bias, chunk_rows=chunk_rows, max_bytes=max_bytes)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "build_neighbours",
    "reference",
    "requested_backend",
    "resolve_backend",
    "submanifold_conv3d",
    "use_backend",
]
