"""Plain-torch reference of the DiT blocks' norm epilogues (the CPU/MPS path and the ground truth).

Both functions reproduce, op for op, the rounding points of the reference DiT (SPEC 3.3-3.7): every norm,
RMSNorm and RoPE is computed in float32 and rounded once to the activation dtype; the modulation
``h * (1 + scale) + shift`` and the residual ``x + y * gate`` run as separate ops in the activation dtype (so
each product and sum is rounded, as torch does it in bf16). The Triton kernels in ``triton.py`` compute the same
function in one pass; for float32 tensors they agree with this to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual add, then LayerNorm (+ affine) (+ AdaLN modulation), returning both the new stream and its norm.

    x:     [..., C] residual stream in the activation dtype (bf16/fp16/fp32).
    y:     None or [..., C] branch output (same dtype); the stream becomes ``x + y * gate`` (``x + y`` if no gate).
    gate, shift, scale: None or per-item/per-token vectors broadcastable to x ([B, 1, C] for x [B, L, C],
           [N, C] for packed tokens), in the activation dtype.
    norm:  False -> only the residual add (returns (x_new, None)).
    weight, bias: None or float32 [C] affine LayerNorm params (``norm2`` of the blocks).
    eps:   LayerNorm epsilon (1e-6 in the blocks).
    ->     (x_new [..., C], h [..., C] or None), both in x's dtype.
    """
    if y is not None:
        x = x + (y * gate if gate is not None else y)
    if not norm:
        return x, None
    xf = x.float()
    h = F.layer_norm(xf, xf.shape[-1:], weight, bias, eps).to(x.dtype)
    if scale is not None:
        h = h * (1 + scale)
    if shift is not None:
        h = h + shift
    return x, h


def rms_norm_rope(
    x: torch.Tensor, gamma: torch.Tensor, phases: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """Per-head QK-RMSNorm (``F.normalize(x) * gamma * sqrt(D)``) then optional interleaved-pair RoPE.

    x:      [..., H, D] any float dtype (may be a strided view, e.g. q out of a fused qkv).
    gamma:  [H, D] float32.
    phases: None or complex64 [..., L, D/2] broadcast over heads (leading dims broadcast against x's).
    scale:  the RMSNorm scale, default sqrt(D).
    ->      [..., H, D] in x's dtype; norm rounded to x's dtype, then the rotation in float32, rounded again.
    """
    d = x.shape[-1]
    scale = d**0.5 if scale is None else scale
    h = (F.normalize(x.float(), dim=-1) * gamma * scale).to(x.dtype)
    if phases is None:
        return h
    hc = torch.view_as_complex(h.float().reshape(*h.shape[:-1], -1, 2))
    return torch.view_as_real(hc * phases.unsqueeze(-2)).flatten(-2).to(h.dtype)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The first half of the DiT MLP: ``gelu_tanh(x @ weight.T + bias)``, rounded after the Linear and again after
    the GELU (the reference's two modules).

    x: [..., K]; weight: [N, K]; bias: None or [N] (x's dtype) -> [..., N] in x's dtype.
    """
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
