"""AdaLN-single ("share_mod") conditioning of the DiT blocks (SPEC 3.1, 3.2).

One shared ``adaLN_modulation = Sequential(SiLU, Linear(C, 6C))`` maps the timestep embedding to
``mod [B, 6C]`` once per forward; every block adds its own free parameter ``modulation [6C]`` and splits the
sum into shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (in this order).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .ops import resolve

CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def shared_adaln(channels: int, *, ops=None, device=None) -> nn.Sequential:
    """The model-level ``adaLN_modulation`` (keys ``1.weight [6C, C]``, ``1.bias [6C]``), float32."""
    ops = resolve(ops)
    return nn.Sequential(nn.SiLU(), ops.Linear(channels, 6 * channels, bias=True, device=device, dtype=torch.float32))


def block_parameter(channels: int, *, device=None) -> nn.Parameter:
    """A block's additive ``modulation [6C]`` parameter (float32; random like the reference, loaded anyway)."""
    return nn.Parameter(torch.randn(6 * channels, device=device, dtype=torch.float32) / channels**0.5)


def split_modulation(
    param: torch.Tensor, mod: torch.Tensor, per_token: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """The six modulation vectors of one block, broadcastable against its tokens.

    param:     [6C] float32 block parameter.
    mod:       [B, 6C] shared modulation, already in the block dtype.
    per_token: maps a per-item [B, K] tensor to one broadcastable against the tokens ([B, 1, K] for a dense
               batch, [N, K] for packed variable-length tokens).
    The sum is formed in float32 (fp32 param + low-precision mod) and rounded to ``mod.dtype``, as the reference.
    """
    return per_token((param + mod).to(mod.dtype)).chunk(6, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (kept as separate ops: same bf16 rounding as the reference)."""
    return x * (1 + scale) + shift
