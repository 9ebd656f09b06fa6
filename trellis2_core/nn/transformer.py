"""The modulated cross-attention transformer block of both TRELLIS.2 DiTs (SPEC 3.3).

``ModulatedTransformerCrossBlock`` is the reference's ``ModulatedTransformerCrossBlock`` (dense) and
``ModulatedSparseTransformerCrossBlock`` (sparse) in one module: the math is per token except attention,
and attention takes the token layout (dense [B, L, C] or packed varlen [N, C], see ``attention.py``).

Precision (SPEC 3.7): Linear weights in the block dtype (bf16 for the released DiTs); ``modulation``,
``norm2`` affine and RMSNorm gammas in float32; activations arrive in the block dtype and every norm, RMSNorm
and RoPE is computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import CrossAttention, SelfAttention, VarLen, per_token
from .modulation import block_parameter, modulate, split_modulation
from .norm import layer_norm_32
from .ops import resolve


class FeedForward(nn.Module):
    """``mlp.0`` Linear(C -> int(C * ratio)), GELU (tanh approximation), ``mlp.2`` Linear(hidden -> C)."""

    def __init__(self, channels: int, mlp_ratio: float, *, ops=None, device=None, dtype=None):
        super().__init__()
        ops = resolve(ops)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            ops.Linear(channels, hidden, bias=True, device=device, dtype=dtype),
            nn.GELU(approximate="tanh"),
            ops.Linear(hidden, channels, bias=True, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """Self-attention (AdaLN-modulated, gated) -> cross-attention (affine LN, ungated) -> MLP (modulated, gated).

    Only the AdaLN-single layout (``share_mod=True``: a per-block additive ``modulation`` parameter) exists
    here; it is the one every TRELLIS.2 checkpoint uses.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        use_rope: bool = True,
        qk_rms_norm: bool = True,
        qk_rms_norm_cross: bool = True,
        ops=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        ops = resolve(ops)
        self.norm2 = ops.LayerNorm(channels, eps=1e-6, elementwise_affine=True, device=device, dtype=torch.float32)
        self.self_attn = SelfAttention(
            channels, num_heads, qk_rms_norm=qk_rms_norm, use_rope=use_rope, ops=ops, device=device, dtype=dtype
        )
        self.cross_attn = CrossAttention(
            channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross, ops=ops, device=device, dtype=dtype
        )
        self.mlp = FeedForward(channels, mlp_ratio, ops=ops, device=device, dtype=dtype)
        self.modulation = block_parameter(channels, device=device)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        phases: torch.Tensor | None = None,
        varlen: VarLen | None = None,
    ) -> torch.Tensor:
        """One block.

        x:       [B, L, C] dense tokens, or [N, C] packed tokens with ``varlen``; in the block dtype.
        mod:     [B, 6C] shared modulation in the block dtype.
        context: [B, Lc, Cc] condition tokens in the block dtype.
        phases:  RoPE phases complex64 broadcastable to the tokens ([L, D/2], [B, L, D/2] or [N, D/2]).
        ->       same shape and dtype as x.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = split_modulation(
            self.modulation, mod, lambda v: per_token(v, varlen)
        )
        h = modulate(layer_norm_32(x), shift_msa, scale_msa)
        x = x + self.self_attn(h, phases, varlen) * gate_msa
        x = x + self.cross_attn(layer_norm_32(x, self.norm2), context, varlen)
        h = modulate(layer_norm_32(x), shift_mlp, scale_mlp)
        return x + self.mlp(h) * gate_mlp
