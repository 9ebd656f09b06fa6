"""Block streaming: run a DiT whose ``blocks`` live in (pinned) CPU memory, one block on the device at a time.

    streamer = stream_blocks(model, "cuda", prefetch=1)   # blocks -> CPU, top-level layers -> cuda
    out = model(x, t, cond)                               # same call, same result, bit for bit
    unstream(model)                                       # hooks removed; blocks stay in CPU memory

Why: a 1.3B-parameter TRELLIS.2 DiT holds 2.55 GB of block weights (bf16) next to ~0.07 GB of top-level layers
(t_embedder, adaLN_modulation, input/out layers). Streaming keeps only (1 + prefetch) blocks of ~85 MB each on
the GPU. Each forward copies the 2.55 GB once over PCIe (~0.1 s at 25 GB/s from pinned memory); with
``prefetch`` the copy of block i+1 runs on a side CUDA stream while block i computes, so at the token counts
where memory is tight (tens of thousands of tokens, ~1 s per forward on an H100) the copy is mostly hidden.

Mechanics: every block gets a forward pre-hook that points its parameters' ``.data`` at device copies (made now,
or earlier by the prefetch on the side stream, waited for with an event) and starts the next block's copy; a
forward hook points them back at the CPU copies, so the device copies die with the block's last kernel (they are
``record_stream``-ed on the compute stream, so the caching allocator does not hand their memory to the next
prefetch before that kernel ran). Parameters keep their identity, so ``state_dict()`` and ``load_state_dict``
keep working (they see the CPU tensors). On CPU (or any non-CUDA device) the copies are plain ``.to(device)`` and
there are no streams; CPU to CPU copies too, so tests on the CPU see each block's tensors come and go.
``.data`` can only be swapped between devices of one tensor type (CPU <-> CUDA, not <-> meta).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_ATTR = "_trellis2_streamer"


@dataclasses.dataclass
class _Slot:
    """The tensors of one block: (owner module, attribute name, is_parameter, CPU tensor)."""

    entries: list[tuple[nn.Module, str, bool, torch.Tensor]]


class BlockStreamer:
    """The state ``stream_blocks`` attaches to a model (``model._trellis2_streamer``); see the module docstring."""

    def __init__(self, model: nn.Module, device: torch.device, prefetch: int, pin: bool, attr: str):
        self.device = device
        self.prefetch = prefetch
        self.attr = attr
        self.blocks: list[nn.Module] = list(getattr(model, attr))
        self.slots = [self._host(block, pin) for block in self.blocks]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, tuple[list[torch.Tensor], Any]] = {}  # block index -> (device tensors, event)
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(block.register_forward_hook(self._make_post(i)))
        self.loads = 0  # blocks copied to the device so far (tests and logs)

    @staticmethod
    def _host(block: nn.Module, pin: bool) -> _Slot:
        entries = []
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    entries.append((module, name, True, p.data))
            for name, b in module._buffers.items():
                if b is not None:
                    entries.append((module, name, False, b))
        host = []
        for module, name, is_param, t in entries:
            cpu = t.detach().to("cpu")
            if pin and not cpu.is_pinned():
                cpu = cpu.pin_memory()  # pinned: the only memory a non_blocking H2D copy can overlap with compute
            host.append((module, name, is_param, cpu))
            _assign(module, name, is_param, cpu)
        return _Slot(host)

    # -------------------------------------------------------------------------------------------- copies
    def _issue(self, i: int) -> None:
        """Start copying block i to the device (on the side stream when on CUDA). No-op if already pending."""
        if i >= len(self.blocks) or i in self._pending:
            return
        entries = self.slots[i].entries
        if self.stream is None:
            # copy=True also on CPU -> CPU, so a streamed CPU model really runs on fresh copies (what tests observe)
            self._pending[i] = ([t.to(self.device, copy=True) for *_, t in entries], None)
        else:
            # The side stream must not start before the compute stream has reached this point (ordering of
            # the allocations against memory the compute stream freed and may still be using).
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                tensors = [t.to(self.device, non_blocking=True) for *_, t in entries]
                event = torch.cuda.Event()
                event.record(self.stream)
            self._pending[i] = (tensors, event)
        self.loads += 1

    def _make_pre(self, i: int):
        def pre_hook(module, args):
            self._issue(i)
            tensors, event = self._pending.pop(i)
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for t in tensors:
                    t.record_stream(compute)  # freed after this block: reuse waits for the compute stream
            for (owner, name, is_param, _), t in zip(self.slots[i].entries, tensors):
                _assign(owner, name, is_param, t)
            for j in range(i + 1, i + 1 + self.prefetch):
                self._issue(j)

        return pre_hook

    def _make_post(self, i: int):
        def post_hook(module, args, output):
            for owner, name, is_param, cpu in self.slots[i].entries:
                _assign(owner, name, is_param, cpu)

        return post_hook

    def release(self) -> None:
        """Drop prefetched copies that no forward consumed (e.g. a forward that raised) and restore CPU tensors."""
        self._pending.clear()
        for slot in self.slots:
            for owner, name, is_param, cpu in slot.entries:
                _assign(owner, name, is_param, cpu)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()


def _assign(module: nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
    if is_param:
        module._parameters[name].data = tensor  # keep the Parameter object: optimisers/state_dict see one identity
    else:
        module._buffers[name] = tensor


def stream_blocks(model: nn.Module, device: torch.device | str, *, prefetch: int = 1, pin_memory: bool | None = None,
                  attr: str = "blocks") -> BlockStreamer:  # fmt: skip
    """Keep ``model.<attr>`` (a ModuleList) in CPU memory and stream each block to ``device`` for its forward.

    Every parameter and buffer outside ``attr`` moves to ``device`` now and stays there. prefetch: how many
    following blocks are copied ahead (0 = copy each block when it starts; 1 = the default, one block ahead).
    pin_memory: pin the CPU copies (default: when ``device`` is CUDA). Calling it again on a streamed model
    first removes the old hooks (e.g. to change the device). Returns the ``BlockStreamer`` (also at
    ``model._trellis2_streamer``). Outputs are identical to running the model resident on ``device``.
    """
    blocks = getattr(model, attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"stream_blocks: model.{attr} must be an nn.ModuleList of blocks; got {type(blocks).__name__}")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"stream_blocks: prefetch must be an integer >= 0; got {prefetch!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    unstream(model)
    pin = (device.type == "cuda") if pin_memory is None else bool(pin_memory)
    resident = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in resident:
            continue
        for name, p in module._parameters.items():
            if p is not None:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    streamer = BlockStreamer(model, device, prefetch, pin, attr)
    object.__setattr__(model, _ATTR, streamer)  # a plain attribute: not a submodule, not in state_dict
    log.debug("streaming %d blocks of %s to %s (prefetch %d)", len(streamer.blocks), type(model).__name__, device, prefetch)
    return streamer


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    """The model's BlockStreamer, or None when it is not streamed."""
    return getattr(model, _ATTR, None)


def unstream(model: nn.Module) -> bool:
    """Remove the streaming hooks. Blocks stay in CPU memory, other layers on the streamed device (move the model
    with ``.to`` as needed). Returns whether the model was streamed."""
    streamer = streamer_of(model)
    if streamer is None:
        return False
    streamer.remove()
    object.__delattr__(model, _ATTR)
    return True


__all__ = ["BlockStreamer", "stream_blocks", "streamer_of", "unstream"]
