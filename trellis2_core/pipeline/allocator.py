"""The CUDA caching allocator under a VRAM budget (``memory.components_for`` asks for it)."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads the first, older the second


def prefer_expandable_segments(device: torch.device | str) -> bool:
    """Under a VRAM budget on CUDA: switch torch's caching allocator to expandable segments (one growable mapping
    per stream instead of fixed-size blocks) unless the user configured the allocator (``PYTORCH_ALLOC_CONF`` /
    ``PYTORCH_CUDA_ALLOC_CONF``) or another backend runs (cudaMallocAsync: ComfyUI's default; its nodes never
    call this). Why: the decoders allocate feature tensors of up to GiBs per level, and fixed blocks fragment. H100,
    1536_cascade under a 10.5 GiB cap (``bench/bench_pipeline.py --vram-budget 10.5 --plan``): the default
    allocator failed a 2.48 GiB request with 6.06 GiB allocated and 2.44 GiB reserved but unused; with expandable
    segments the run completed (peak 8.91 GiB allocated, 10.47 GiB reserved). Applies to memory reserved from now
    on. Returns whether it switched."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    if any(os.environ.get(name) for name in ALLOC_ENV) or torch.cuda.get_allocator_backend() != "native":
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setter("expandable_segments:True")
    except RuntimeError as e:  # a build or platform without them: keep the default
        log.info("expandable segments unavailable (%s); the allocator keeps its default", e)
        return False
    log.info("vram_budget: CUDA caching allocator switched to expandable segments (set %s to choose yourself)", ALLOC_ENV[0])
    return True


__all__ = ["ALLOC_ENV", "prefer_expandable_segments"]
