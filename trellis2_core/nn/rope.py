"""Exact 3D rotary position embedding of the TRELLIS.2 DiTs (SPEC 3.5).

For head dim D there are D/2 complex pairs. Each axis a in (x, y, z) gets ``F = D // 2 // 3`` frequencies
``freq_j = base0 / base1 ** (j / F)`` (21 for D = 128); pair ``a*F + j`` rotates by ``coord[a] * freq_j``.
The pairs left over (D/2 - 3F; one for D = 128) get angle 0, i.e. identity. Pairs are INTERLEAVED,
``(x[2m], x[2m+1])`` is the complex number ``x[2m] + i x[2m+1]`` (not the rotate-half layout).

Coordinates are raw integer voxel indices (no centring, no scaling): the 16^3 grid index of a dense token,
``coords[:, 1:]`` of a sparse voxel. Phases and the rotation are computed in float32 (complex64) and the
result is cast back to the activation dtype, as the reference does.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_ROPE_FREQ = (1.0, 10000.0)


def rope_frequencies(
    head_dim: int, *, dims: int = 3, rope_freq: Sequence[float] = DEFAULT_ROPE_FREQ, device=None
) -> torch.Tensor:
    """The ``head_dim // 2 // dims`` per-axis frequencies, float32 ``[F]``."""
    freq_dim = head_dim // 2 // dims
    j = torch.arange(freq_dim, dtype=torch.float32, device=device) / freq_dim
    return rope_freq[0] / (rope_freq[1] ** j)


def rope_phases(coords: torch.Tensor, head_dim: int, *, rope_freq: Sequence[float] = DEFAULT_ROPE_FREQ) -> torch.Tensor:
    """Unit complex rotations of each token.

    coords: [..., L, 3] integer (or integral float) voxel coordinates (x, y, z).
    ->      [..., L, head_dim // 2] complex64; the trailing ``head_dim/2 - 3F`` pairs are exactly 1 + 0i.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim; got {head_dim}")
    dims = coords.shape[-1]
    freqs = rope_frequencies(head_dim, dims=dims, rope_freq=rope_freq, device=coords.device)
    # [..., L, dims, F] -> [..., L, dims*F]: axis-major blocks of F frequencies (x block, y block, z block).
    angles = (coords.to(torch.float32)[..., None] * freqs).flatten(-2)
    pad = head_dim // 2 - angles.shape[-1]
    if pad:
        angles = torch.cat([angles, angles.new_zeros(*angles.shape[:-1], pad)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def grid_coords(resolution: int, *, device=None) -> torch.Tensor:
    """Coordinates of a dense ``R^3`` grid in token order (token = x*R*R + y*R + z): int64 ``[R^3, 3]``."""
    r = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` by ``phases``.

    x:      [..., L, H, D] any float dtype (q or k after the QK-RMSNorm).
    phases: [..., L, D/2] complex64 (broadcast over heads; leading dims broadcast against x's).
    ->      same shape and dtype as x; rotation computed in float32.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * phases.unsqueeze(-2)).flatten(-2).to(x.dtype)
