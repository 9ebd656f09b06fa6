"""Plain-torch reference of the SC-VAE blocks' norm (the CPU/MPS path and the ground truth).

The blocks (``trellis2_core/models/sparse_unet_vae.py``) normalise their fp16 features as the reference
``LayerNorm32`` does: LayerNorm over the channels computed in float32, the result rounded to the feature dtype;
the down/up blocks then apply SiLU to that rounded value (``F.silu`` of a half tensor computes in float32 and
rounds once). ``layer_norm_32`` is that op sequence, op for op, so its results are bit-identical to it; the
Triton kernel in ``triton.py`` rounds at the same two points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_out(x: torch.Tensor, out: torch.Tensor | None) -> None:
    """Raise ValueError unless ``out`` is None or a tensor of x's shape, dtype and device."""
    if out is None:
        return
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"layer_norm_32: out must have x's shape, dtype and device {tuple(x.shape)} {x.dtype} {x.device}; got "
            f"{tuple(out.shape)} {out.dtype} {out.device}. Pass out=None to get a new tensor"
        )


def layer_norm_32(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim in float32, rounded to ``x.dtype``, then optionally SiLU.

    x:      [..., C] features, any float dtype (fp16 as the released decoders run; fp32 in the CPU tests).
    weight, bias: None or float32 [C] affine params (``norm1`` / ``norm`` of the blocks); None: no affine.
    eps:    LayerNorm epsilon (1e-6 in the blocks).
    silu:   apply SiLU to the rounded LayerNorm result (computed in float32 for half types, rounded once).
    out:    None or a tensor of x's shape and dtype to write the result into; it may be x itself (the chunked
            decoder normalises its features in place). Any overlap with x is fine here.
    ->      [..., C] in x's dtype (``out`` when given).
    """
    check_out(x, out)
    xf = x.float()
    h = F.layer_norm(xf, xf.shape[-1:], weight, bias, eps).to(x.dtype)
    if silu:
        h = F.silu(h, inplace=True)  # h is a fresh tensor (layer_norm's output or its cast); same values as F.silu(h)
    if out is None:
        return h
    return out.copy_(h)
