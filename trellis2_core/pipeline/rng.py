"""The pipeline's random stream.

The reference seeds torch's global CPU generator once and draws every noise tensor from it in a fixed order
(SS noise, shape noise (LR then HR), texture noise), then moves the noise to the device: the same seed gives
the same noise on every device. We draw from a private CPU generator with the same seed, which yields the
identical stream without touching the caller's global RNG state. Each stage result carries the generator
state after its draws, so stages run as separate ComfyUI nodes continue one stream exactly like one call.

Host values go to the GPU through ``upload`` (pinned memory, asynchronous copy): a plain ``.to("cuda")`` of a
pageable tensor waits for everything queued on the stream, which at a stage boundary would stall the host until
the previous stage's sampling loop has finished, and leave the GPU idle while the next stage prepares.
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
    """float32 standard normal noise drawn on the CPU stream, then moved to ``device`` (``upload``)."""
    return upload(torch.randn(shape, generator=g, dtype=torch.float32), device)


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait for the device's queued work.

    CUDA: copied from pinned memory with ``non_blocking=True`` (torch's pinned-memory cache keeps the staging
    block alive until the copy has run, so ``t`` may be dropped at once); other devices: ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    try:
        pinned = t.pin_memory()
    except RuntimeError:  # no page-locked memory to be had (container limits): the plain copy, which waits
        return t.to(device)
    return pinned.to(device, non_blocking=True)
