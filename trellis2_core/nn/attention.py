"""Multi-head self- and cross-attention of the DiTs (SPEC 3.4), over dense or variable-length token batches.

Token layouts (the same modules serve both):
  dense   x [B, L, C]: every item has L tokens. The SS model always; sparse batches whose items have equal
          lengths (B = 1, or the classifier-free-guidance pair sharing coordinates) are viewed this way too,
          so the common case is one batched SDPA call.
  varlen  x [N, C] with a ``VarLen`` (host offsets of each item): attention stays within each item
          (one SDPA call per item; items are few), cross-attention of item b sees only ``context[b]``.

The SDPA backend is chosen at call time (never at import): explicit ``backend=`` argument, then the
``attention_backend(...)`` context manager, then the environment variable ``TRELLIS2_ATTENTION_BACKEND``
(read on every call), then "auto". An explicit choice torch cannot honour raises ConfigError.

"auto" is torch's own choice except for half-precision tensors on Hopper GPUs (compute capability 9.x), where
cuDNN's fused attention is tried first, then flash, efficient, math (torch falls through the list when a
backend cannot take the inputs). Why: on an H100 (torch 2.11, cuDNN 9.19, bench/dit_probe.py) cuDNN ran the
DiTs' 12 x 128 attention at 1.6-1.75x the speed of torch's default flash kernel (12.5k tokens: 624 vs 371
TFLOP/s; 3k: 374 vs 214; 46.6k: 567 vs 369), same error against fp32. torch 2.11 itself already picked cuDNN
for the DiTs' layouts there (same forward times with "default"); the explicit order keeps that independent of
the torch version. "default" is torch's own choice always.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...kernels import dit_norm
from ..errors import ConfigError
from .norm import MultiHeadRMSNorm
from .ops import resolve
from .rope import apply_rope

ENV_VAR = "TRELLIS2_ATTENTION_BACKEND"
BACKENDS = {
    "auto": None,
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_BACKEND = contextvars.ContextVar("trellis2_attention_backend", default=None)
# "auto" on Hopper: cuDNN first (see the module docstring); torch skips a backend that cannot take the inputs.
_HOPPER_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_capability: dict[int, tuple[int, int]] = {}


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"{where}: attention backend must be one of {sorted(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def attention_backend(name: str):
    """Use SDPA backend ``name`` ("auto", "default", "flash", "efficient", "cudnn", "math") inside the block."""
    token = _BACKEND.set(_check_backend(name, "attention_backend()"))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def resolve_backend(explicit: str | None = None) -> str:
    """The backend in force now: explicit argument > context manager > env var > "auto"."""
    if explicit is not None:
        return _check_backend(explicit, "backend argument")
    if _BACKEND.get() is not None:
        return _BACKEND.get()
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_backend(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, no mask.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (one dtype) -> [B, Lq, H, D] in q's dtype.
    """
    name = resolve_backend(backend)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if BACKENDS[name] is None:
        order = _auto_order(q) if name == "auto" else None
        if order is None:
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    try:
        with sdpa_kernel([BACKENDS[name]]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    except RuntimeError as e:
        raise ConfigError(
            f"attention backend {name!r} cannot run q {tuple(q.shape)} {q.dtype} on {q.device}: {e}. "
            f"Choose another backend or 'auto' (argument, attention_backend(), or {ENV_VAR})."
        ) from e
    return out.transpose(1, 2)


def _auto_order(q: torch.Tensor) -> list[SDPBackend] | None:
    """The backend priority "auto" uses for q (None = torch's default order); see the module docstring."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not _HAS_SET_PRIORITY:
        return None
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    return _HOPPER_ORDER if _capability[index][0] == 9 else None


def _has_set_priority() -> bool:
    try:  # torch >= 2.6; older torch keeps its default order under "auto"
        return "set_priority" in inspect.signature(sdpa_kernel).parameters
    except (TypeError, ValueError):
        return False


_HAS_SET_PRIORITY = _has_set_priority()


@dataclasses.dataclass(frozen=True, eq=False)
class VarLen:
    """Packed variable-length batch: item b owns token rows ``[offsets[b], offsets[b+1])`` of an [N, ...] tensor.

    offsets:     host ints [B+1] (no device sync to slice).
    batch_index: int64 [N] on the tokens' device, the item of every row (to broadcast per-item vectors).
    """

    offsets: tuple[int, ...]
    batch_index: torch.Tensor

    @classmethod
    def from_offsets(cls, offsets, device) -> VarLen:
        offsets = tuple(int(o) for o in offsets)
        # One fill per item (items are few), not a host list copied to the device: no host->device copy, so
        # the layout can be built inside a CUDA-graph capture and never blocks the host.
        parts = [torch.full((b - a,), i, dtype=torch.long, device=device) for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
        return cls(offsets, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return len(self.offsets) - 1

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """[B, ...] per-item tensor -> [N, ...] one row per token."""
        return v[self.batch_index]


def per_token(v: torch.Tensor, varlen: VarLen | None) -> torch.Tensor:
    """Broadcast per-item [B, K] to tokens: [B, 1, K] (dense [B, L, C] tokens) or [N, K] (varlen)."""
    return v.unsqueeze(1) if varlen is None else varlen.per_token(v)


def _attend(q, k, v, varlen: VarLen | None, *, kv_per_item: bool) -> torch.Tensor:
    """Dense: q/k/v [B, L, H, D]. Varlen: q [N, H, D]; k/v [N, H, D] (self) or [B, Lk, H, D] (kv_per_item)."""
    if varlen is None:
        return scaled_dot_product_attention(q, k, v)
    backend = resolve_backend()
    outs = []
    for b, (s, e) in enumerate(zip(varlen.offsets[:-1], varlen.offsets[1:])):
        if e == s:
            continue
        kb, vb = (k[b : b + 1], v[b : b + 1]) if kv_per_item else (k[None, s:e], v[None, s:e])
        outs.append(scaled_dot_product_attention(q[None, s:e], kb, vb, backend=backend)[0])
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


class SelfAttention(nn.Module):
    """Self-attention with fused ``to_qkv`` (channel layout [3, H, D]), QK-RMSNorm, then RoPE, then ``to_out``.

    Linear layers are created in ``dtype`` (the block precision); RMSNorm gammas stay float32.
    """

    def __init__(
        self, channels: int, num_heads: int, *, qk_rms_norm: bool, use_rope: bool, ops=None, device=None, dtype=None
    ):
        super().__init__()
        ops = resolve(ops)
        self.num_heads, self.head_dim, self.use_rope = num_heads, channels // num_heads, use_rope
        self.to_qkv = ops.Linear(channels, 3 * channels, bias=True, device=device, dtype=dtype)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads, device=device)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads, device=device)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = ops.Linear(channels, channels, bias=True, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, phases: torch.Tensor | None = None, varlen: VarLen | None = None, *, norm_backend=None
    ) -> torch.Tensor:
        """x: [B, L, C] or [N, C] (varlen); phases: complex64 [(B,) L, D/2] or [N, D/2] -> same shape as x.

        norm_backend: ``kernels.dit_norm`` backend of the fused QK-RMSNorm + RoPE (None = its call-time choice)."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        if self.use_rope and phases is None:
            raise ValueError("SelfAttention(use_rope=True) needs the RoPE phases of the tokens")
        ph = phases if self.use_rope else None
        if self.qk_rms_norm:
            qn, kn = self.q_rms_norm, self.k_rms_norm
            q = dit_norm.rms_norm_rope(q, qn.gamma, ph, scale=qn.scale, backend=norm_backend)
            k = dit_norm.rms_norm_rope(k, kn.gamma, ph, scale=kn.scale, backend=norm_backend)
        elif ph is not None:
            q, k = apply_rope(q, ph), apply_rope(k, ph)
        h = _attend(q, k, v, varlen, kv_per_item=False)
        return self.to_out(h.flatten(-2))


class CrossAttention(nn.Module):
    """Cross-attention to a dense context: ``to_q`` (C->C), ``to_kv`` (Cc->2C, layout [2, H, D]), QK-RMSNorm, no RoPE."""

    def __init__(
        self, channels: int, ctx_channels: int, num_heads: int, *, qk_rms_norm: bool, ops=None, device=None, dtype=None
    ):
        super().__init__()
        ops = resolve(ops)
        self.num_heads, self.head_dim = num_heads, channels // num_heads
        self.to_q = ops.Linear(channels, channels, bias=True, device=device, dtype=dtype)
        self.to_kv = ops.Linear(ctx_channels, 2 * channels, bias=True, device=device, dtype=dtype)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads, device=device)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads, device=device)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = ops.Linear(channels, channels, bias=True, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        varlen: VarLen | None = None,
        *,
        norm_backend=None,
        zero_from: int | None = None,
    ) -> torch.Tensor:
        """x: [B, L, C] or [N, C] (varlen); context: [B, Lc, Cc] (item b of x attends to context[b] only).

        zero_from: items ``zero_from..B-1`` have an all-zero context (the sampler's negative condition). Their keys
        are then identical, attention over them is uniform, and its output is the (shared) value of a zero token
        whatever the query: ``to_out(v(0))``, one vector, computed once here instead of attending (equal to the
        full computation up to the rounding of a mean of identical values; tests/test_dit.py)."""
        if zero_from is not None:
            items = context.shape[0]
            if not 0 <= zero_from <= items:
                raise ValueError(f"zero_from must be in [0, {items}] (the batch size); got {zero_from}")
            if zero_from < items:
                return self._zero_tail(x, context, varlen, zero_from, norm_backend)
        return self._attend_context(x, context, varlen, norm_backend)

    def _zero_tail(self, x, context, varlen, first, norm_backend) -> torch.Tensor:
        kv = self.to_kv(context[first : first + 1, :1]).unflatten(-1, (2, self.num_heads, self.head_dim))
        const = self.to_out(kv[..., 1, :, :].flatten(-2))  # [1, 1, C]: what every token of a zero item gets
        if varlen is None:  # dense [B, L, C]
            zero = const.expand(x.shape[0] - first, x.shape[1], -1)
            if first == 0:
                return zero.contiguous()
            return torch.cat([self._attend_context(x[:first], context[:first], None, norm_backend), zero])
        split = varlen.offsets[first]
        zero = const[0].expand(x.shape[0] - split, -1)
        if first == 0:
            return zero.contiguous()
        head = VarLen(varlen.offsets[: first + 1], varlen.batch_index[:split])
        return torch.cat([self._attend_context(x[:split], context[:first], head, norm_backend), zero])

    def _attend_context(self, x, context, varlen, norm_backend) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = self.to_kv(context).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(-3)
        if self.qk_rms_norm:
            qn, kn = self.q_rms_norm, self.k_rms_norm
            q = dit_norm.rms_norm_rope(q, qn.gamma, scale=qn.scale, backend=norm_backend)
            k = dit_norm.rms_norm_rope(k, kn.gamma, scale=kn.scale, backend=norm_backend)
        h = _attend(q, k, v, varlen, kv_per_item=True)
        return self.to_out(h.flatten(-2))
