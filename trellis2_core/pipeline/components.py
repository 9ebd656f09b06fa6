"""Pipeline components: lazily loaded networks with a memory policy.

Stages never hold models. They ask ``components.use(role)`` for one, run it, and give it back; the policy
decides what stays resident. This is the seam where ComfyUI's model management plugs in (the nodes layer
passes its own object with the same ``use`` / ``device`` interface), and where the CLI's low-VRAM policy
lives, so that a 1024^3 run never holds all eight networks on the GPU at once.

Roles are the official ``pipeline.json`` model roles (``sparse_structure_flow_model``, ``shape_slat_decoder``,
...), plus ``image_cond_model`` for DINOv3.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Callable, Iterator, Literal, Mapping, Protocol

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

Policy = Literal["keep", "offload", "free"]


class ComponentSource(Protocol):
    """What a stage needs: the compute device and a way to borrow a model by role."""

    device: torch.device

    def use(self, role: str) -> contextlib.AbstractContextManager[torch.nn.Module]: ...


class Components:
    """Models built on first use from ``loaders[role]()`` and kept according to ``policy``.

    policy:
      "keep"    every model stays on ``device`` once loaded (fastest; needs memory for all of them).
      "offload" a model moves to ``offload_device`` (CPU) when its stage ends and back when needed again.
      "free"    a model is dropped when its stage ends and re-read from disk when needed again (least memory).
    Loaders return a module ready for inference on ``device`` (eval mode, no grad needed).
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], torch.nn.Module]],
        device: torch.device | str,
        *,
        policy: Policy = "keep",
        offload_device: torch.device | str = "cpu",
    ):
        if policy not in ("keep", "offload", "free"):
            raise ValueError(f"policy must be 'keep', 'offload' or 'free'; got {policy!r}")
        self.device = torch.device(device)
        self.policy = policy
        self.offload_device = torch.device(offload_device)
        self._loaders = dict(loaders)
        self._loaded: dict[str, torch.nn.Module] = {}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self._loaders)

    def has(self, role: str) -> bool:
        return role in self._loaders

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[torch.nn.Module]:
        if role not in self._loaders:
            raise CheckpointError(
                f"this pipeline has no '{role}' model (it has {sorted(self._loaders)}); "
                "choose a pipeline type whose models the snapshot contains, or download the complete pipeline"
            )
        model = self._loaded.get(role)
        if model is None:
            log.info("loading %s", role)
            model = self._loaders[role]()
            self._loaded[role] = model
        elif self.policy == "offload":
            model.to(self.device)
        try:
            yield model
        finally:
            self._release(role)

    def _release(self, role: str) -> None:
        if self.policy == "keep":
            return
        if self.policy == "offload":
            self._loaded[role].to(self.offload_device)
        else:
            del self._loaded[role]
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload_all(self) -> None:
        """Drop every loaded model (e.g. before a run that needs the memory)."""
        self._loaded.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
