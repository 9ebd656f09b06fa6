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
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Mapping, Protocol

import torch

from ..errors import CheckpointError
from ..models.decoder_chunking import chunk_decoder
from ..nn.kept_graphs import release_graphs
from ..nn.streaming import stream_blocks, streamer_of, unstream

if TYPE_CHECKING:
    from .memory import MemoryPlan

log = logging.getLogger(__name__)

Policy = Literal["keep", "offload", "free"]


class ComponentSource(Protocol):
    """What a stage needs: the compute device and a way to borrow a model by role."""

    device: torch.device

    def use(self, role: str) -> contextlib.AbstractContextManager[torch.nn.Module]: ...


class PlanSwitches:
    """The memory plan's switches the stages read from a component source (``plan`` None: no plan, all on)."""

    plan: MemoryPlan | None = None

    @property
    def batched_cfg(self) -> bool:
        """Whether guided steps may run both CFG branches as one batch (False when the plan needs the memory)."""
        return True if self.plan is None else self.plan.batched_cfg

    @property
    def cuda_graphs(self) -> bool:
        """Whether sampling loops may replay CUDA graphs (False when the plan has no room for their memory)."""
        return True if self.plan is None else self.plan.cuda_graphs

    @property
    def keep_graphs(self) -> bool:
        """Whether the SS stage's CUDA graphs may outlive its loop for the next generation (``nn/kept_graphs.py``):
        the source releases them whenever it moves or drops that model's weights."""
        return self.cuda_graphs and (True if self.plan is None else self.plan.keep_graphs)


class Components(PlanSwitches):
    """Models built on first use from ``loaders[role]()`` and kept according to ``policy``.

    policy:
      "keep"    every model stays on ``device`` once loaded (fastest; needs memory for all of them).
      "offload" a model moves to ``offload_device`` (CPU) when its stage ends and back when needed again. On CUDA
                the CPU copy is pinned and kept (weights never change at inference): releasing only drops the GPU
                copy and the next upload runs at DMA speed (H100: 0.08 s per 2.6 GB DiT instead of 2.2 s from
                pageable memory; 1024_cascade under a 12 GB budget 19.1 s -> 8.9 s).
      "free"    a model is dropped when its stage ends and re-read from disk when needed again (least memory).
    Loaders return a module ready for inference on ``device`` (eval mode, no grad needed).

    plan (optional, ``pipeline/memory.py``): for its ``stream_roles`` (DiTs) ``use`` streams the blocks from CPU
    memory (``nn/streaming.py``; their loaders may return them on the CPU), for its ``decoder_roles`` it sets
    the decoder chunk size, and ``batched_cfg`` tells the stages whether guided steps may batch both branches.
    """

    def __init__(
        self,
        loaders: Mapping[str, Callable[[], torch.nn.Module]],
        device: torch.device | str,
        *,
        policy: Policy = "keep",
        offload_device: torch.device | str = "cpu",
        plan: MemoryPlan | None = None,
    ):
        if policy not in ("keep", "offload", "free"):
            raise ValueError(f"policy must be 'keep', 'offload' or 'free'; got {policy!r}")
        self.device = torch.device(device)
        self.policy = policy
        self.offload_device = torch.device(offload_device)
        self._loaders = dict(loaders)
        self._loaded: dict[str, torch.nn.Module] = {}
        self._pinned: dict[str, dict[str, torch.Tensor]] = {}
        self.plan = plan

    def _streams(self, role: str) -> bool:
        return self.plan is not None and self.plan.stream_blocks and role in self.plan.stream_roles

    def _prepare(self, role: str, model: torch.nn.Module) -> None:
        """Apply the plan to a model about to run: stream a DiT's blocks, set a decoder's chunk size."""
        if self.plan is None:
            return
        if self._streams(role) and streamer_of(model) is None:
            stream_blocks(model, self.device, prefetch=self.plan.prefetch)
        if role in self.plan.decoder_roles:
            chunk_decoder(model, self.plan.decoder_chunk_voxels)

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
        elif self.policy == "offload" and not self._streams(role):
            model.to(self.device)
        self._prepare(role, model)
        try:
            yield model
        finally:
            self._release(role)

    def _release(self, role: str) -> None:
        model = self._loaded[role]
        streamer = streamer_of(model)
        if streamer is not None:
            streamer.release()  # copies a failed forward left on the device
        if self.policy == "keep":
            return
        release_graphs(model)  # kept CUDA graphs read these weights where they are now
        unstream(model)  # blocks are in CPU memory already; the top-level layers follow below
        if self.policy == "offload":
            self._offload(role, model)
        else:
            del model, self._loaded[role]
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _offload(self, role: str, model: torch.nn.Module) -> None:
        # Components that only wrap a module (the DINOv3 conditioner) move with their own .to().
        if self.device.type != "cuda" or self.offload_device.type != "cpu" or not isinstance(model, torch.nn.Module):
            model.to(self.offload_device)
            return
        store = self._pinned.get(role)
        if store is None:
            store = self._pinned[role] = {k: t.detach().to("cpu").pin_memory() for k, t in _tensors(model)}
        for k, t in _tensors(model):
            t.data = store[k]

    def unload_all(self) -> None:
        """Drop every loaded model (e.g. before a run that needs the memory)."""
        for model in self._loaded.values():
            release_graphs(model)
        self._loaded.clear()
        self._pinned.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def batched_cfg(components: ComponentSource) -> bool:
    """Whether guided steps may run both branches as one batch of two (True unless a memory plan says no)."""
    return bool(getattr(components, "batched_cfg", True))


def cuda_graphs(components: ComponentSource) -> bool:
    """Whether sampling loops may replay CUDA graphs (True unless a memory plan says no)."""
    return bool(getattr(components, "cuda_graphs", True))


def keep_graphs(components: ComponentSource) -> bool:
    """Whether a loop's graphs may be kept for the next generation: only for sources that say so (they must call
    ``nn.kept_graphs.release_graphs`` when they move or drop a model's weights)."""
    return bool(getattr(components, "keep_graphs", False))
