"""The pipeline's random stream.

The reference seeds torch's global CPU generator once and draws every noise tensor from it in a fixed order
(SS noise, shape noise (LR then HR), texture noise), then moves the noise to the device: the same seed gives
the same noise on every device. We draw from a private CPU generator with the same seed, which yields the
identical stream without touching the caller's global RNG state. Each stage result carries the generator
state after its draws, so stages run as separate ComfyUI nodes continue one stream exactly like one call.
"""

from __future__ import annotations

import torch

from ..errors import InputError

MAX_SEED = 2**64 - 1


def generator(seed: int | None = None, state: torch.Tensor | None = None) -> torch.Generator:
    """A CPU generator from a seed, or continuing from a saved state (exactly one of the two)."""
    if (seed is None) == (state is None):
        raise ValueError("pass exactly one of seed or state")
    g = torch.Generator(device="cpu")
    if state is not None:
        g.set_state(state)
        return g
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an integer in [0, 2**64 - 1]; got {seed!r}")
    g.manual_seed(seed)
    return g


def randn(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 standard normal noise drawn on the CPU stream, then moved to ``device``."""
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)
