"""Sinusoidal timestep embedding followed by a two-layer MLP (SPEC 3.1).

The sampler passes ``t_in = 1000 * t`` (t in [0, 1], t = 1 is pure noise). The embedding is
``[cos(t_in * f), sin(t_in * f)]`` with ``f_j = exp(-ln(10000) * j / half)``: cosine FIRST, which is the
GLIDE/DiT order and the opposite of some other DiT code bases (a swap silently changes every output).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .ops import resolve


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``t``.

    t:   [B] any float dtype (values ~0..1000); computed in float32.
    ->   [B, dim] float32, ``[cos | sin]`` halves (a zero column is appended when ``dim`` is odd).
    """
    half = dim // 2
    # Same operation order as the reference (-ln(P) * j, then / half) so float32 rounding matches.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t [B] -> t_emb [B, hidden]`` float32. Keys ``mlp.0`` Linear(freq->hidden), ``mlp.2`` Linear(hidden->hidden).

    Its parameters are float32 whatever precision the transformer blocks use (SPEC 3.7).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, *, ops=None, device=None):
        super().__init__()
        ops = resolve(ops)
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            ops.Linear(frequency_embedding_size, hidden_size, bias=True, device=device, dtype=torch.float32),
            nn.SiLU(),
            ops.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=torch.float32),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))
