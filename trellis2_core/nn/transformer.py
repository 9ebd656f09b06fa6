"""The modulated cross-attention transformer block of both TRELLIS.2 DiTs (SPEC 3.3).

``ModulatedTransformerCrossBlock`` is the reference's ``ModulatedTransformerCrossBlock`` (dense) and
``ModulatedSparseTransformerCrossBlock`` (sparse) in one module: the math is per token except attention,
and attention takes the token layout (dense [B, L, C] or packed varlen [N, C], see ``attention.py``).

Precision (SPEC 3.7): Linear weights in the block dtype (bf16 for the released DiTs); ``modulation``,
``norm2`` affine and RMSNorm gammas in float32; activations arrive in the block dtype and every norm, RMSNorm
and RoPE is computed in float32 and cast back.

Speed (issue 7): the norm epilogues (residual add + LayerNorm + modulation; QK-RMSNorm + RoPE) go through
``kernels.dit_norm``, which fuses each into one Triton kernel for CUDA bf16/fp16 tensors and otherwise runs the
plain-torch reference (the same ops as before, so CPU/fp32 results are unchanged); the MLP's Linear + GELU become
one cuBLASLt GEMM with the GELU in its epilogue on CUDA bf16/fp16 (one rounding fewer than the two modules). Optionally the whole block
is run through ``torch.compile`` (see ``compile_blocks``; off unless asked for at call time).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import contextlib
import contextvars
import logging
import os

from ...kernels import dit_norm
from ...kernels import fp8 as fp8_kernels
from .attention import CrossAttention, SelfAttention, VarLen, per_token
from .fp8 import Fp8Linear
from .modulation import block_parameter, split_modulation
from .norm import layer_norm_32
from .ops import resolve

logger = logging.getLogger(__name__)

COMPILE_ENV_VAR = "TRELLIS2_DIT_COMPILE"
_COMPILE = contextvars.ContextVar("trellis2_dit_compile", default=None)
_compiled: dict[str, object] = {}


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

    def forward(self, x: torch.Tensor, *, norm_backend: str | None = None) -> torch.Tensor:
        """x [..., C] -> [..., C]. The Linear + GELU go through ``dit_norm.linear_gelu`` (one cuBLASLt GEMM with the
        GELU in its epilogue for CUDA half tensors) when the layers are the plain torch modules; with FP8 layers
        (``nn/fp8.py``) the GELU is applied while quantising the hidden for the second GEMM; injected casting
        ops (ComfyUI) and a replaced activation run the modules as they are."""
        fc1, act, fc2 = self.mlp
        gelu = type(act) is nn.GELU and act.approximate == "tanh"
        if gelu and isinstance(fc1, Fp8Linear) and isinstance(fc2, Fp8Linear):
            # FP8 weights (nn/fp8.py): GELU and the row quantisation of the 8192-wide hidden in one pass
            q, scale = fp8_kernels.quantize_rows(fc1(x), gelu=True)
            return fc2.forward_quantized(q, scale)
        plain = type(fc1).forward is nn.Linear.forward and gelu
        if not plain:
            return self.mlp(x)
        return fc2(dit_norm.linear_gelu(x, fc1.weight, fc1.bias, backend=norm_backend))


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
        zero_from: int | None = None,
    ) -> torch.Tensor:
        """One block.

        x:       [B, L, C] dense tokens, or [N, C] packed tokens with ``varlen``; in the block dtype.
        mod:     [B, 6C] shared modulation in the block dtype.
        context: [B, Lc, Cc] condition tokens in the block dtype.
        phases:  RoPE phases complex64 broadcastable to the tokens ([L, D/2], [B, L, D/2] or [N, D/2]).
        zero_from: items zero_from.. have an all-zero context (``CrossAttention.forward``); None: not known.
        ->       same shape and dtype as x.
        """
        if varlen is None and x.is_cuda and _compile_mode() is not None:
            fn = _compiled_block(_compile_mode())
            if fn is not None:
                return fn(self, x, mod, context, phases, "torch", zero_from)
        return self._forward(x, mod, context, phases, varlen, None, zero_from)

    def _forward(self, x, mod, context, phases, varlen, norm_backend, zero_from=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = split_modulation(
            self.modulation, mod, lambda v: per_token(v, varlen)
        )
        rn = dit_norm.residual_norm
        _, h = rn(x, shift=shift_msa, scale=scale_msa, backend=norm_backend)
        y = self.self_attn(h, phases, varlen, norm_backend=norm_backend)
        n2 = self.norm2
        if type(n2).forward is nn.LayerNorm.forward and n2.weight is not None and n2.weight.dtype == torch.float32:
            x, h = rn(x, y, gate_msa, weight=n2.weight, bias=n2.bias, eps=n2.eps, backend=norm_backend)
        else:  # injected casting ops (ComfyUI): let the module apply its own weights
            x, _ = rn(x, y, gate_msa, norm=False, backend=norm_backend)
            h = layer_norm_32(x, n2)
        y = self.cross_attn(h, context, varlen, norm_backend=norm_backend, zero_from=zero_from)
        x, h = rn(x, y, shift=shift_mlp, scale=scale_mlp, backend=norm_backend)
        x, _ = rn(x, self.mlp(h, norm_backend=norm_backend), gate_mlp, norm=False, backend=norm_backend)
        return x


def _run_block(block, x, mod, context, phases, norm_backend, zero_from=None):
    return block._forward(x, mod, context, phases, None, norm_backend, zero_from)


@contextlib.contextmanager
def compile_blocks(mode: str | None = "default"):
    """Run the DiT blocks through ``torch.compile`` inside this context (CUDA, dense token layouts only).

    mode: a ``torch.compile`` mode ("default", "max-autotune-no-cudagraphs", ...) or None to turn it off.
    Outside any context the environment variable ``TRELLIS2_DIT_COMPILE`` (read on every call; "1" means
    "default", any other non-empty value is the mode, "0"/"" off) decides. Compilation that fails is logged once
    and the block falls back to eager (with the fused Triton norms).
    """
    token = _COMPILE.set(mode or "off")
    try:
        yield
    finally:
        _COMPILE.reset(token)


def _compile_mode() -> str | None:
    mode = _COMPILE.get()
    if mode is None:
        mode = os.environ.get(COMPILE_ENV_VAR, "").strip()
        mode = {"1": "default", "0": "", "off": ""}.get(mode.lower(), mode)
    return None if mode in ("", "off") else mode


def _compiled_block(mode: str):
    """The compiled block function for ``mode`` (built on first use), or None when compile is unavailable."""
    if mode not in _compiled:
        try:
            import torch._dynamo  # noqa: F401  (import errors mean no compile support here)

            _compiled[mode] = torch.compile(_run_block, mode=mode, dynamic=False)
        except Exception as e:  # any failure to set up compile -> eager; logged, never silent
            logger.warning("torch.compile of the DiT blocks unavailable (%s); running eager", e)
            _compiled[mode] = None
    return _compiled[mode]
