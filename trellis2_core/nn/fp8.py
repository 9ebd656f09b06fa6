"""FP8 DiT weights (opt-in): the transformer blocks' Linear layers stored as float8 e4m3, computed as FP8 GEMMs.

Why: the five flow DiTs hold 13.1 of the official pipeline's 15.1 GB of weights (manifests), 97% of it in the
blocks' Linear layers. Stored as e4m3 with one float32 scale per output channel those take half the memory of
the released bf16 (a 1.3 B DiT: 2.6 GB -> 1.3 GB), and on GPUs with FP8 matrix units (compute capability >= 8.9:
RTX 40xx, L4/L40, H100) each GEMM runs as ``torch._scaled_mm`` on row-quantised activations
(``kernels/fp8``). Elsewhere (older GPUs, CPU) the same function runs emulated from the dequantised operands.
Measured on an H100 (bench/RESULTS.md, session 7): an HR SLat forward 1.065x and an SS one 1.11x faster than bf16,
1024_cascade 5.45-5.53 -> 5.15-5.45 s, peak memory 17.1 -> 11.2 GiB; 512 is no faster (its stages are bound by
kernel launches, and fp8 adds the quantisation passes).

Numerics: not the reference's. Each GEMM's operands carry e4m3's 3 mantissa bits (relative rounding <= 2^-4 per
value, ~3e-2 relative error per GEMM on random data; a full-size forward with random weights moves from 1.2e-2
to 1.5e-2 relative distance to float32). A whole model also amplifies the small GPU/CPU differences more than
bf16 does (a value one bf16 ulp apart can round to the neighbouring e4m3 code). What fp8 does to the released
weights' outputs has not been measured (they cannot be downloaded where this was written). The norms, attention,
embeddings and the input/output layers stay in the block precision; only ``blocks.*`` Linear layers change.

Shapes: ``Fp8Linear`` takes x [..., K] in its output dtype (the block precision) and returns [..., N];
``forward_quantized`` takes already-quantised rows (the MLP quantises GELU's output in the same pass).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...kernels import fp8 as fp8_kernels
from ..errors import InputError


class Fp8Linear(nn.Module):
    """A Linear layer whose weight is float8 e4m3 [N, K] with a float32 scale per output channel [N].

    ``weight`` keeps the Linear's name (the state dict stays readable: ``...to_qkv.weight`` is the e4m3 codes,
    ``...to_qkv.weight_scale`` their scales); ``bias`` stays in the block precision. Build with ``from_linear``.
    """

    def __init__(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
    ):
        super().__init__()
        if weight.dtype != fp8_kernels.E4M3 or weight.dim() != 2:
            raise ValueError(f"weight must be float8_e4m3fn [N, K]; got {weight.dtype} {tuple(weight.shape)}")
        if weight_scale.shape != weight.shape[:1] or weight_scale.dtype != torch.float32:
            raise ValueError(
                f"weight_scale must be float32 [{weight.shape[0]}]; got {weight_scale.dtype} {tuple(weight_scale.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantise ``linear``'s weight per output channel (on the weight's device); the Linear is left unchanged."""
        q, scale = fp8_kernels.quantize_weight(linear.weight.detach())
        return cls(q, scale, linear.bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in ``out_dtype``: x quantised per row, then the scaled GEMM."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: x has {x.shape[-1]} features, the layer takes {self.in_features}")
        q, scale = fp8_kernels.quantize_rows(x)
        return self.forward_quantized(q, scale)

    def forward_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """q [..., K] e4m3 and scale [..., 1] float32 (``kernels.fp8.quantize_rows``) -> [..., N] in ``out_dtype``."""
        return fp8_kernels.scaled_linear(q, scale, self.weight, self.weight_scale, self.bias, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, e4m3 -> {self.out_dtype}"


def quantize_blocks(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` inside ``model.blocks`` (the DiTs' transformer blocks) by an ``Fp8Linear``
    in place, one layer at a time (peak memory: the model plus one layer). Returns how many were replaced: 0 for
    a model without DiT blocks (VAEs, DINOv3), which is left untouched. Calling it again replaces nothing more."""
    from .transformer import ModulatedTransformerCrossBlock

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not any(isinstance(b, ModulatedTransformerCrossBlock) for b in blocks):
        return 0
    replaced = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # subclasses (injected casting ops) manage their own weights
                    setattr(parent, name, Fp8Linear.from_linear(child))
                    replaced += 1
    return replaced


def is_quantized(model: nn.Module) -> bool:
    """Whether ``quantize_blocks`` has converted some of ``model``'s layers."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def check_fp8_device(device: torch.device | str) -> None:
    """Raise an InputError naming the fix when ``device`` cannot hold float8 tensors (e.g. an Apple GPU)."""
    device = torch.device(device)
    try:
        torch.zeros(1, device=device).to(fp8_kernels.E4M3)
    except (RuntimeError, TypeError) as e:
        raise InputError(
            f"fp8 DiT weights: the device {device} has no float8 type ({e}); turn fp8 off for this device "
            "(CUDA GPUs and the CPU support it)"
        ) from e


__all__ = ["Fp8Linear", "check_fp8_device", "is_quantized", "quantize_blocks"]
