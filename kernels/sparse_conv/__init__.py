"""Submanifold 3x3x3 sparse convolution (the only conv of the SC-VAEs), with its backend chosen at call time.

``reference`` is plain torch (the CPU/MPS path and the ground truth); ``triton`` is the CUDA implicit-GEMM kernel.
Both share the neighbour-map contract of ``reference.build_neighbours``. The Triton kernel can also run from a
``plan.TilePlan`` of the map (rows grouped by which neighbours they have, so tiles skip the offsets none of their
rows needs): worth its build cost where ``wants_plan`` says so (measured on an H100, see bench/decoder_probe.py).

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
from .plan import TilePlan, build_tile_plan
from .reference import build_neighbours, neighbours_from_parent

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


# Planned tiles pay from here (H100, fp16, sphere-shell levels of the 1024 decoder): Ci <= 256 ran 1.3-1.9x faster
# (the plan skips 20-30% of the work and gathers fewer rows per output); Ci 512/1024 ran 0.9-1.0x. A level whose
# only conv is Co = 64 (the decoder's last) does not repay the plan's build (4 ms at 3.6 M voxels for 1.8 ms saved).
PLAN_MAX_CI, PLAN_MIN_CO = 256, 128


def wants_plan(feats: torch.Tensor, ci: int, co: int, backend: str | None = None) -> bool:
    """Whether a conv of ``feats`` (Ci -> Co) should run the planned Triton kernel (only where Triton runs)."""
    if ci > PLAN_MAX_CI or co < PLAN_MIN_CO or feats.shape[0] == 0:
        return False
    return resolve_backend(feats.device, backend) == "triton"


def submanifold_conv3d(
    feats: torch.Tensor,
    neighbours: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    plan: TilePlan | None = None,
    chunk_rows: int | None = None,
    max_bytes: int = reference.DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Submanifold 3x3x3 convolution; see ``reference.submanifold_conv3d`` for shapes and semantics.

    backend: "auto" / "torch" / "triton" / None (= context, then env var, then auto).
    plan: a ``build_tile_plan(neighbours)``; the triton backend then runs the planned kernel (same sums), the
        torch backend ignores it.
    chunk_rows, max_bytes: only the torch backend materialises a gathered block; they bound its size (memory).
    The triton backend holds no temporary beyond the [N, Co] output.
    """
    if resolve_backend(feats.device, backend) == "triton":
        if plan is not None:
            plan.check(neighbours.shape[0])
        return _triton_module(required=True).submanifold_conv3d(feats, neighbours, weight, bias, plan)
    return reference.submanifold_conv3d(feats, neighbours, weight, bias, chunk_rows=chunk_rows, max_bytes=max_bytes)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "TilePlan",
    "build_neighbours",
    "build_tile_plan",
    "neighbours_from_parent",
    "reference",
    "requested_backend",
    "resolve_backend",
    "submanifold_conv3d",
    "use_backend",
    "wants_plan",
]
