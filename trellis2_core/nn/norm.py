"""Norms of the DiT blocks, computed in float32 whatever the activation dtype (SPEC 3.3, 3.4, 3.7)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm_32(x: torch.Tensor, norm: nn.Module | None = None, *, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim in float32, result cast back to ``x.dtype``.

    norm: an affine LayerNorm module (float32 params; e.g. ``blocks.i.norm2``) or None for the parameter-free
          norm1/norm3 of the blocks (eps 1e-6; the DiTs' final norm uses eps 1e-5, see the models).
    """
    xf = x.float()
    out = norm(xf) if norm is not None else F.layer_norm(xf, xf.shape[-1:], eps=eps)
    return out.to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head QK norm: ``x / max(||x||, 1e-12) * gamma[h] * sqrt(D)``, computed in float32.

    This is ``F.normalize`` (eps on the norm), NOT ``x / sqrt(mean(x^2) + eps)``: with a real eps the two
    differ for small vectors. x: [..., H, D] -> same shape and dtype. Param ``gamma`` [H, D] float32.
    """

    def __init__(self, dim: int, heads: int, *, device=None):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)
