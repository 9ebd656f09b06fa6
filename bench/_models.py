"""Helpers of bench_pipeline.py: full-size random models, fixed sphere-shell structures, FLOP counting, timed stages.

Nothing here is library code: it patches model *instances* (never classes or files) so that random-weight decoders
subdivide like a trained one on a known surface, which fixes the voxel counts every run sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.models.sparse_unet_vae import SparseResBlockC2S3d
from trellis2.trellis2_core.nn.cuda_graphs import GraphedModel
from trellis2.trellis2_core.nn.fp8 import Fp8Linear, quantize_blocks
from trellis2.trellis2_core.nn.transformer import FeedForward
from trellis2.trellis2_core.pipeline import Components
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.sparse.conv import SparseConv3d
from trellis2.trellis2_core.sparse.spatial import subdivision_from_mask
from trellis2.trellis2_core.weights import Normalization

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "data" / "manifests"
PIPELINE = json.loads((MANIFESTS / "pipeline.json").read_text())["args"]
ROLES = PIPELINE["models"]  # role -> "ckpts/<name>" (manifest file = last path part)


def official_sizes(fp8: bool = False) -> dict:
    """{role: ModelSize} of the official pipeline from the manifests, plus DINOv3 ViT-L (for the memory planner)."""
    from trellis2.trellis2_core.pipeline.model_sizes import DINOV3_VITL16_BYTES, IMAGE_COND, ModelSize, sizes_from_manifests

    manifests = {role: json.loads((MANIFESTS / f"{path.split('/')[-1]}.json").read_text()) for role, path in ROLES.items()}
    out = sizes_from_manifests(manifests, fp8=fp8)
    out[IMAGE_COND] = ModelSize(IMAGE_COND, "image_cond", DINOV3_VITL16_BYTES)
    return out


def normalization(key: str) -> Normalization:
    e = PIPELINE[key]
    return Normalization(mean=tuple(e["mean"]), std=tuple(e["std"]))


# ------------------------------------------------------------------------------------------------ models
@torch.no_grad()
def fill_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Small random normals on the device (no CPU init): std 1/sqrt(fan_in) for matrices/convs, norms at 1,
    residual outputs (ConvNeXt mlp.2) at 0.2x so 16-32 residual blocks keep fp16 activations at O(1)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            scale = 0.2 if name.endswith("mlp.2.weight") else 1.0
            p.normal_(0.0, scale / math.sqrt(p[0].numel()))
        elif name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
            p.fill_(1.0)
        elif "modulation" in name:
            p.normal_(0.0, 2.45 / math.sqrt(p.shape[0]))  # the DiT bench's choice: gates of O(1)
        else:
            p.normal_(0.0, 0.02)
    return model


def build(role: str, device: torch.device, seed: int = 0, fp8: bool = False) -> nn.Module:
    """Full-size model of a pipeline role with random weights: built on meta, materialised on ``device``; fp8: the
    DiTs' block Linear layers quantised as the engine's fp8 option does (``nn/fp8.py``)."""
    name = ROLES[role].split("/")[-1]
    cfg = json.loads((MANIFESTS / f"{name}.json").read_text())["config"]
    model = from_config(cfg, device="meta").to_empty(device=device).eval()
    fill_random_(model, seed)
    if hasattr(model, "set_resolution") or role == "shape_slat_decoder":
        attach_shell_subdivision(model)
    if fp8:
        quantize_blocks(model)
    return model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ structures
SHELLS = {  # pipeline type -> (radius rho in the unit cube, half-thickness w of the LR upsample's shell)
    "512": (0.36, 0.0),  # ~3.0k tokens at 32^3, ~0.75 M voxels at 512^3
    "1024_cascade": (0.40, 0.0),  # ~3.7k LR tokens, ~12.5k HR tokens at 64^3, ~3.8 M voxels at 1024^3
    "1536_cascade": (0.45, 0.0022),  # ~5k LR tokens, ~47-49k HR tokens at 96^3 (the 49,152 cap), ~11 M voxels
}


def shell_keep(coords: torch.Tensor, grid: int, rho: float, w: float) -> torch.Tensor:
    """bool [N]: voxel (integer coords [N, 4], grid ``grid``) may hold surface of the sphere |p - c| = rho.

    |d - rho| < w + sqrt(3)/(2 grid): a child passing it has a parent passing it, so levels nest exactly."""
    c = (coords[:, 1:].float() + 0.5) / grid - 0.5
    return (c.norm(dim=1) - rho).abs() < w + math.sqrt(3) / (2 * grid)


CHILD_OFFSETS = [[s & 1, (s >> 1) & 1, (s >> 2) & 1] for s in range(8)]  # child s: x = bit 0, y = bit 1, z = bit 2


def shell_coords(grid: int, rho: float, w: float, device) -> torch.Tensor:
    """[N, 4] int32 coords (batch 0) of the shell voxels of a grid^3 (grid = 2^k * g0, g0 <= 48): enumerate a
    coarse grid, then subdivide (no dense grid at 1024^3). Parent-major order, like the decoder's output."""
    g = grid
    while g > 48 and g % 2 == 0:
        g //= 2
    r = torch.arange(g, device=device)
    xyz = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    c = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
    c = c[shell_keep(c, g, rho, w)]
    off = torch.tensor(CHILD_OFFSETS, device=device)
    while g < grid:
        child = c[:, None, :].repeat(1, 8, 1)
        child[:, :, 1:] = child[:, :, 1:] * 2 + off
        g *= 2
        c = child.reshape(-1, 4)
        c = c[shell_keep(c, g, rho, w)]
    return c.int()


def batched(coords: torch.Tensor, items: int) -> torch.Tensor:
    """``items`` copies of batch-0 ``coords`` as one batch (item i's batch index i): the guided pair at items=2."""
    return torch.cat([torch.cat([torch.full_like(coords[:, :1], i), coords[:, 1:]], 1) for i in range(items)])


SHELL_NOW = {"rho": 0.4, "w": 0.0}  # the pipeline type being run sets this (survives 'free' rebuilds)


def attach_shell_subdivision(decoder: nn.Module) -> None:
    """Make a random-weight shape decoder subdivide onto the sphere shell (same cost: to_subdiv still runs).

    The latent grid G is read off the latent (the shell is centred: mean coord = (G - 1) / 2); ``upsample`` uses
    the shell of ``SHELL_NOW`` (rho, w), the full decode w = 0 (a thin surface, like a trained decoder's output).
    """
    decoder._shell_w = 0.0
    from_latent, upsample = decoder._from_latent, decoder.upsample

    def _from_latent(self, x):
        decoder._shell_base = int(round(2 * x.coords[:, 1:].float().mean().item() + 1))
        return from_latent(x)

    def _upsample(self, x, upsample_times):
        decoder._shell_w = SHELL_NOW["w"]
        try:
            return upsample(x, upsample_times)
        finally:
            decoder._shell_w = 0.0

    decoder._from_latent = types.MethodType(_from_latent, decoder)
    decoder.upsample = types.MethodType(_upsample, decoder)
    level = 0
    for blocks in decoder.blocks:
        for block in blocks:
            if isinstance(block, SparseResBlockC2S3d):
                block.subdivide = types.MethodType(_make_subdivide(decoder, level), block)
                level += 1


def _make_subdivide(decoder, level):
    offsets = torch.tensor(CHILD_OFFSETS)

    def subdivide(self, x, guide=None):
        logits = self.to_subdiv(x.feats)  # the real head's work, then overridden by the geometry
        grid = decoder._shell_base * 2 ** (level + 1)
        child = x.coords[:, None, :].long().repeat(1, 8, 1)
        child[:, :, 1:] = child[:, :, 1:] * 2 + offsets.to(x.device)
        keep = shell_keep(child.reshape(-1, 4), grid, SHELL_NOW["rho"], decoder._shell_w).reshape(-1, 8)
        logits = torch.where(keep, 1.0, -1.0).to(logits.dtype)
        return subdivision_from_mask(x, keep), SparseTensor(logits, x.coords)

    return subdivide


# ------------------------------------------------------------------------------------------------ FLOPs
class FlopCounter:
    """Matrix FLOPs by forward hooks: Linear 2*rows*in*out, SparseConv3d 2*N*27*Ci*Co (nominal, all 27 taps),
    Conv3d 2*out_voxels*27*Ci*Co, DiT attention 4*n*(n + L)*C per block and item (self n x n, cross n x L)."""

    def __init__(self):
        self.flops = 0.0
        self.handles: list = []

    def detach(self) -> None:
        """Remove every hook (a hooked module call takes torch's slow path: host time the user's run does not pay)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def attach(self, model: nn.Module) -> None:
        # the DiT MLP's first Linear may run inside one fused GEMM (dit_norm.linear_gelu), not as a module call,
        # and an FP8 MLP's second one through forward_quantized: both counted by a hook on the FeedForward instead
        fused = {id(m.mlp[i]) for m in model.modules() if isinstance(m, FeedForward) for i in (0, 2)}
        hook = self.handles.append
        for m in model.modules():
            if isinstance(m, FeedForward):
                hook(m.register_forward_hook(self._feedforward))
            if isinstance(m, (nn.Linear, Fp8Linear)) and id(m) not in fused:
                hook(m.register_forward_hook(self._linear))
            elif isinstance(m, SparseConv3d):
                hook(m.register_forward_hook(self._spconv))
            elif isinstance(m, nn.Conv3d):
                hook(m.register_forward_hook(self._conv3d))
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "num_heads"):
            hook(model.register_forward_pre_hook(self._attention, with_kwargs=True))

    def _linear(self, m, inp, out):
        self.flops += 2.0 * (inp[0].numel() // m.in_features) * m.in_features * m.out_features

    def _feedforward(self, m, inp, out):
        fc1, fc2 = m.mlp[0], m.mlp[2]
        rows = inp[0].numel() // fc1.in_features
        self.flops += 2.0 * rows * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)

    def _spconv(self, m, inp, out):
        self.flops += 2.0 * inp[0].feats.shape[0] * 27 * m.in_channels * m.out_channels

    def _conv3d(self, m, inp, out):
        k = math.prod(m.kernel_size)
        self.flops += 2.0 * (out.numel() // m.out_channels) * k * m.in_channels * m.out_channels // m.groups

    def _attention(self, model, args, kwargs):
        x, cond = args[0], args[2]
        b, length = cond.shape[0], cond.shape[1]
        n = (x.feats.shape[0] if isinstance(x, SparseTensor) else x[0, 0].numel()) / b
        c = model.config.model_channels
        attending = kwargs.get("zero_cond_from")  # items from here on skip cross-attention (zero condition)
        attending = b if attending is None else attending
        self.flops += model.config.num_blocks * 4.0 * n * (b * n + attending * length) * c


class CountingGraphedModel(GraphedModel):
    """GraphedModel whose replays add their FLOPs to ``COUNTER`` (a replay runs no Python, so no hooks fire).

    The capture call runs the forward (hooks fire once) and is replayed once: that delta is the key's FLOPs.
    bench_pipeline.py installs it as ``pipeline.guidance.GraphedModel`` (a module global, not library code)."""

    counter: FlopCounter | None = None
    trace: list | None = None  # set to a list: one (stage, kind, rows, host ms of the call, host ms since the last)
    stage = ""
    _last = 0.0
    _calls = 0  # sampler calls so far in the current stage

    _flops: dict[tuple, float] = {}  # (model id, key) -> FLOPs of one call; class-wide: kept graphs outlive a loop

    def __call__(self, x, t, cond, **kwargs):
        c = self.counter
        f0, r0, k0 = (c.flops if c else 0.0), self.replays, self.captures
        t0 = time.perf_counter()
        rows = x.feats.shape[0] if isinstance(x, SparseTensor) else x.shape[0]
        CountingGraphedModel._calls += 1
        with torch.profiler.record_function(f"call {CountingGraphedModel._calls} ({rows} rows)"):  # for --gaps
            out = super().__call__(x, t, cond, **kwargs)
        if self.trace is not None:
            t1 = time.perf_counter()
            kind = "capture" if self.captures > k0 else "replay" if self.replays > r0 else "eager"
            gap = 1e3 * (t0 - CountingGraphedModel._last) if CountingGraphedModel._last else 0.0
            self.trace.append((self.stage, kind, rows, 1e3 * (t1 - t0), gap))
            CountingGraphedModel._last = t1
        if c is not None and self.replays > r0:
            key = (id(self.model), self.key(x, t, cond, **kwargs))
            if c.flops > f0:
                self._flops[key] = c.flops - f0
            else:
                c.flops += self._flops.get(key, 0.0)
        return out


# ------------------------------------------------------------------------------------------------ stages
class TimedComponents(Components):
    """Components that records, per ``use``: role, load/move time, run time, peak memory, FLOPs.

    The records cost what a user's run does not pay: a device synchronisation at both ends of every stage (so a
    stage's host work, e.g. its first graph capture, cannot overlap the previous stage's queued GPU work) and a
    forward hook on every Linear/conv. ``plain()`` turns all of that off for the runs whose wall time is quoted."""

    def __init__(self, loaders, device, *, policy="keep", pinned: bool = False, plan=None):
        super().__init__(loaders, device, policy=policy, plan=plan)
        self.pinned = pinned and policy == "offload"
        self._pinned: dict[str, dict[str, torch.Tensor]] = {}
        self.records: list[dict] = []
        self.counter = FlopCounter()
        self._hooked: set[int] = set()
        self.is_plain = False

    @contextlib.contextmanager
    def plain(self):
        """Inside: no hooks, no per-stage synchronisation or records, the library's own GraphedModel (the bench's
        counting subclass while ``CountingGraphedModel.trace`` is on: a clock read and an append per sampler call,
        no FLOPs, so a plain run's calls can be traced too)."""
        from trellis2.trellis2_core.pipeline import guidance

        self.counter.detach()
        self._hooked.clear()  # re-attached at the next instrumented use
        self.is_plain, graphed = True, guidance.GraphedModel
        guidance.GraphedModel = GraphedModel if CountingGraphedModel.trace is None else CountingGraphedModel
        try:
            yield
        finally:
            self.is_plain, guidance.GraphedModel = False, graphed

    @contextlib.contextmanager
    def use(self, role: str):
        if self.is_plain:  # only the profiler's stage range (free unless a profiler runs: --gaps) and the trace's name
            CountingGraphedModel.stage = role
            with super().use(role) as model, torch.profiler.record_function(f"stage {role}"):
                yield model
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        CountingGraphedModel.stage, CountingGraphedModel._last, CountingGraphedModel._calls = role, 0.0, 0
        with super().use(role) as model:
            if id(model) not in self._hooked:
                self.counter.attach(model)
                self._hooked.add(id(model))
            torch.cuda.synchronize()
            t1, at1 = time.perf_counter(), time.time()
            f0 = self.counter.flops
            with torch.profiler.record_function(f"stage {role}"):  # names the stage in a profile (--gaps)
                yield model
            torch.cuda.synchronize()
            t2, at2 = time.perf_counter(), time.time()
            peak = torch.cuda.max_memory_allocated()
        torch.cuda.synchronize()
        self.records.append(dict(role=role, load=t1 - t0, run=t2 - t1, release=time.perf_counter() - t2,
                                 peak=peak, flops=self.counter.flops - f0, at=(at1, at2)))  # fmt: skip

    def _release(self, role: str) -> None:
        """``pinned``: offload keeps one pinned CPU copy of the (never changing) weights and only drops the GPU
        copy; the next ``use`` uploads from pinned memory (DMA speed) instead of pageable memory."""
        if self.pinned:
            model = self._loaded[role]
            store = self._pinned.get(role)
            if store is None:
                store = self._pinned[role] = {k: p.detach().cpu().pin_memory() for k, p in model.named_parameters()}
            for k, p in model.named_parameters():
                p.data = store[k]
            torch.cuda.empty_cache()
            return
        if self.policy == "free":
            self._hooked.discard(id(self._loaded.get(role)))
        super()._release(role)
