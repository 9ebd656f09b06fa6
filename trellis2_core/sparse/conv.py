"""SparseConv3d: the submanifold 3x3x3 convolution module of the SC-VAEs (SPEC.md section 7).

Parameters carry the official names and layout: ``weight [Co, 3, 3, 3, Ci]`` (kernel axes x, y, z, then input
channels) and ``bias [Co]``. The neighbour map of a level is cached on the SparseTensor under
``NEIGHBOUR_CACHE_KEY``; every SparseTensor that shares those coordinates (``replace`` keeps the cache) reuses
it, so each level builds it once however many convolutions run there. A level made by subdividing one whose map
exists (``channel2spatial`` leaves ``PARENT_NEIGHBOURS_KEY``) derives its map from the parent's instead of
searching (``neighbours_from_parent``: the same map; H100, 3.65 M voxels: 6.7 ms instead of ~15). Where the
Triton kernel runs a row-tile plan (``kernels.sparse_conv.wants_plan``), the plan is cached beside the map.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...kernels import sparse_conv as _spconv
from ...kernels.sparse_conv import reference as _reference
from .tensor import SparseTensor

NEIGHBOUR_CACHE_KEY = "submconv3d_neighbours_3x3x3"
PARENT_NEIGHBOURS_KEY = "submconv3d_parent_neighbours"  # (parent map, parent [Nf], child [Nf]) until derived
TILE_PLAN_KEY = "submconv3d_tile_plan"


def neighbour_map(x: SparseTensor) -> torch.Tensor:
    """The [N, 27] int32 neighbour map of ``x``'s coordinates (built once, then read from x's cache)."""
    nbr = x.get_cache(NEIGHBOUR_CACHE_KEY)
    if nbr is None:
        link = x.get_cache(PARENT_NEIGHBOURS_KEY)
        if link is not None:
            nbr = _reference.neighbours_from_parent(*link)
            x.set_cache(PARENT_NEIGHBOURS_KEY, None)  # the parent's map need not stay alive for this level
        else:
            nbr = _reference.build_neighbours(x.coords)
        x.set_cache(NEIGHBOUR_CACHE_KEY, nbr)
    return nbr


def tile_plan(x: SparseTensor):
    """The Triton kernel's row-tile plan of ``x``'s neighbour map (built once per level, cached)."""
    plan = x.get_cache(TILE_PLAN_KEY)
    if plan is None:
        plan = _spconv.build_tile_plan(neighbour_map(x))
        x.set_cache(TILE_PLAN_KEY, plan)
    return plan


class SparseConv3d(nn.Module):
    """Submanifold 3x3x3 convolution, stride 1: output voxels = input voxels.

    in_channels, out_channels: Ci, Co. ``device="meta"`` allocates nothing (load with ``assign=True``).
    forward(x: SparseTensor [N, Ci]) -> SparseTensor [N, Co] on the same coords (cache shared), computed and
    returned in the weight dtype (fp16 weights -> fp16 features with fp32 accumulation).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch Conv3d's default init (fan_in = 27*Ci); the reference does the same. Skipped on meta."""
        if self.weight.device.type == "meta":
            return
        # Initialise in [Co, Ci, 3, 3, 3] so fan_in matches nn.Conv3d, then store in the official layout.
        w = torch.empty(self.out_channels, self.in_channels, 3, 3, 3, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.copy_(w.permute(0, 2, 3, 4, 1))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(27 * self.in_channels) if self.in_channels else 0.0
                self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3, bias={self.bias is not None}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(
                f"SparseConv3d: input feats must be [N, {self.in_channels}]; got {tuple(x.feats.shape)}"
            )
        nbr = neighbour_map(x)
        w = self.weight
        feats = x.feats.to(w.dtype)
        plan = tile_plan(x) if _spconv.wants_plan(feats, self.in_channels, self.out_channels) else None
        out = _spconv.submanifold_conv3d(feats, nbr, w, self.bias, plan=plan)  # backend chosen per call
        return x.replace(out)
