"""Memory planner: which policy, streaming, CFG batching and decoder chunking make a pipeline fit a VRAM budget.

    plan = plan_memory(files, "cuda", 12)             # PipelineFiles, {role: ModelSize}, or {role: manifest dict}
    comps = components_for(files, "cuda", None, 12)   # Components that follow the plan (what from_pretrained uses)

Weights come from the checkpoints (``model_sizes.py``: safetensors headers, exact bytes per tensor; 'blocks.*'
split out per block). Activations are rough peaks per stage, from the shapes involved (e = activation element size, 2 for the
released bf16/fp16 blocks; all byte counts are per token or voxel):

* DiT at N tokens (C channels, H = MLP hidden; 1536 / 8192 released): the MLP holds x, h, out [N, C] and the
  hidden and GELU output [N, H]: ``N * (e*(3C + 2H) + 8C)`` (the 8C: fp32 LayerNorm/RMSNorm copies). Flash /
  memory-efficient SDPA keeps attention O(N). Batched CFG doubles N. 54 kB per token released.
* SC-VAE decoder, latent of T tokens: level i has N_i = T * 4^i voxels (each x2 subdivision keeps ~4 of 8
  children of a surface) and C_i channels. A ConvNeXt block (levels that have any: the released decoders have
  none at the finest) peaks at ``11e * N*C`` (x, conv(x), LN out, MLP hidden and SiLU at 4C), ``3e*N*C +
  rows*C*(f + 9e)`` when chunked by ``rows`` (models/decoder_chunking.py). An up block (C -> Co, N -> N' = 4N)
  peaks at ``max(e*(N*C + 8*N*Co + N'*Co), e*N*C + (3e + f)*N'*Co)``; chunked, its LN + SiLU stage is
  ``3e*N'*Co + rows*Co*(f + 2e)``. f = 8 (the torch LayerNorm's float32 copies), 0 where the fused kernel runs
  (``kernels/vae_norm``: CUDA, half features, triton importable, backend not forced to torch). The output head's
  LayerNorm is float32 either way: ``N*C*e + 8*C*(N or rows) + 32*N`` at the finest level. Neighbour maps cost
  108 bytes per voxel (int32 [N, 27]) of the level and the coarser ones (cached, x 4/3), the Triton kernel's
  row-tile plan 112 more where a conv uses it, and the torch conv backend gathers up to 256 MiB more. H100,
  fused path (``bench/decoder_probe.py --memory``): the estimates cover the measured peaks by 0-20% from 3.6 M to
  10.4 M output voxels, whole and chunked (``tests/test_memory.py``).
* DINOv3 and the dense sparse-structure decoder: 0.5 GiB each (small grids: 4101 tokens, 64^3 x 32 ch).

Token counts per pipeline type (``DEFAULT_TOKENS``, override with ``tokens=``) are typical large objects, not
the cap: 512: 8192 tokens; 1024_cascade: 8192 (512 stage) then 24576 (1024 stage, ~6.3 M output voxels).

Decisions, cheapest first: "keep" when every weight plus the largest stage fits; else "offload" (or "free"
when host RAM cannot hold all weights). Then the DiTs: batched CFG if it fits, else one CFG branch at a time,
else block streaming (weights: top-level + 1 + prefetch blocks), else both. Then decoders: chunk rows (2^20
down to 2^14) until the estimate fits. ``fits`` says whether the estimate is within the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import torch

from ...kernels import vae_norm
from ...kernels.sparse_conv import PLAN_MAX_CI, PLAN_MIN_CO
from ..errors import InputError
from ..nn.fp8 import check_fp8_device
from .allocator import prefer_expandable_segments
from .components import Components, Policy
from .model_sizes import DINOV3_VITL16_BYTES, IMAGE_COND, ModelSize, sizes_from_files, sizes_from_manifests
from .types import PIPELINE_TYPES, plan as pipeline_plan

log = logging.getLogger(__name__)

GiB = 2**30
SS_FLOW, SS_DECODER = "sparse_structure_flow_model", "sparse_structure_decoder"
SC_DECODERS = ("shape_slat_decoder", "tex_slat_decoder")
DEFAULT_TOKENS = {"512": (8192, 8192), "1024": (24576, 24576), "1024_cascade": (8192, 24576), "1536_cascade": (8192, 49152)}
_SMALL_STAGE = GiB // 2
_CONV_GATHER = 256 * 2**20
_NBR = 108  # int32 neighbour map bytes per voxel
_PLAN = 112  # the sparse-conv row-tile plan per voxel (int32 [N, 27] map copy + row order) where convs use it
_POLICY_ORDER = ("keep", "offload", "free")


# ---------------------------------------------------------------------------------------------- activations
def dit_activation_bytes(tokens: int, size: ModelSize) -> int:
    """Peak activation bytes of one DiT forward over ``tokens`` tokens (all batch items together)."""
    c, h = size.channels
    return tokens * (size.elem_bytes * (3 * c + 2 * h) + 8 * c)


def _maps(n: int) -> int:
    """Neighbour maps of a level of n voxels and of the coarser levels before it (each 1/4 of the next): cached
    with the sparse tensors, they live through the decode."""
    return _NBR * n * 4 // 3


def decoder_activation_bytes(tokens: int, size: ModelSize, chunk_rows: int | None = None, *, fused_norms: bool = False) -> int:
    """Peak activation bytes of an SC-VAE decode of a ``tokens``-voxel latent (see the module docstring).

    fused_norms: the LayerNorms run as ``kernels.vae_norm``'s fused kernel (CUDA half features), which holds no
    float32 copy; the output head's float32 LayerNorm is float32 either way."""
    e, ch = size.elem_bytes, size.channels
    blocks = size.level_blocks or (1,) * len(ch)
    f32 = 0 if fused_norms else 8  # the torch LayerNorm's float32 copies, bytes per element

    def whole(n: int) -> bool:
        return chunk_rows is None or chunk_rows >= n

    peak = 0
    for i, c in enumerate(ch):
        n = tokens * 4**i
        if blocks[i]:  # ConvNeXt blocks at this level (the released decoders have none at the finest)
            conv = 11 * e * n * c if whole(n) else 3 * e * n * c + chunk_rows * c * (f32 + 9 * e)
            peak = max(peak, conv + 2 * _NBR * n + (_PLAN * n if PLAN_MIN_CO <= c <= PLAN_MAX_CI else 0))
        if i + 1 < len(ch):
            co, n2 = ch[i + 1], 4 * n
            # before conv2: h, skip, conv2's output and LN + SiLU temporaries (float32 x2, e x2), chunked or whole
            ln = (3 * e + f32) * n2 * co if whole(n2) else 3 * e * n2 * co + chunk_rows * co * (f32 + 2 * e)
            up = max(e * (n * c + 8 * n * co + n2 * co), e * n * c + ln)
            peak = max(peak, up + _maps(n2) + (_PLAN * n if c <= PLAN_MAX_CI and 8 * co >= PLAN_MIN_CO else 0))
    last, c = tokens * 4 ** (len(ch) - 1), ch[-1]
    # the head: features (e), their float32 copy and LayerNorm (8), whole or per chunk, and a float32 result
    head = last * c * e + (8 * c * (last if whole(last) else chunk_rows)) + 32 * last + _maps(last)
    return max(peak, head) + _CONV_GATHER


# ---------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class StageEstimate:
    stage: str
    role: str
    weight_bytes: int  # on the device during this stage (all resident models under "keep")
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What ``Components`` does to stay within ``budget_bytes`` (None = unconstrained)."""

    policy: Policy
    stream_blocks: bool
    decoder_chunk_voxels: int | None
    batched_cfg: bool
    pipeline_type: str
    budget_bytes: int | None = None
    usable_bytes: int | None = None
    prefetch: int = 1
    stream_roles: tuple[str, ...] = ()
    decoder_roles: tuple[str, ...] = SC_DECODERS
    stages: tuple[StageEstimate, ...] = ()
    fits: bool = True
    cuda_graphs: bool = True  # sampling loops may replay CUDA graphs (GRAPH_HEADROOM more DiT activations)
    keep_graphs: bool = True  # the SS stage's graphs may stay for the next generation (see _kept_graphs_fit)

    @property
    def peak_bytes(self) -> int:
        return max((s.total_bytes for s in self.stages), default=0)

    def summary(self) -> str:
        chunk = self.decoder_chunk_voxels or "off"
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / GiB:.1f} GiB"
        return (f"{self.pipeline_type} budget {budget}: policy {self.policy}, stream_blocks {self.stream_blocks}, "
                f"batched_cfg {self.batched_cfg}, cuda_graphs {self.cuda_graphs}, keep_graphs {self.keep_graphs}, "
                f"decoder_chunk_voxels {chunk}; estimated peak "
                f"{self.peak_bytes / GiB:.2f} GiB{'' if self.fits else ' (DOES NOT FIT)'}")  # fmt: skip

    def table(self) -> str:
        """Per-stage estimate (GiB) as a Markdown table, headed by ``summary()``."""
        rows = [self.summary(), "", "| stage | role | weights | activations | total |", "|---|---|---|---|---|"]
        for s in self.stages:
            gib = (f"{b / GiB:.2f}" for b in (s.weight_bytes, s.activation_bytes, s.total_bytes))
            rows.append(f"| {s.stage} | {s.role} | {' | '.join(gib)} |")
        return "\n".join(rows)


def parse_vram_budget(value: Any, what: str = "vram_budget") -> float | str | None:
    """None / "none" / "off" / "" -> None (no budget), "auto" -> "auto", a positive number (GiB; "8", "11.5 GB") -> float."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{what} must be 'auto', 'none' or a number of GiB (e.g. 8 or 11.5); got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "none", "off", "unlimited"):
            return None
        if text == "auto":
            return "auto"
        text = text.removesuffix("gib").removesuffix("gb").removesuffix("g").strip()
        try:
            number = float(text)
        except ValueError:
            raise InputError(f"{what} must be 'auto', 'none' or a number of GiB (e.g. 8 or 11.5); got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise InputError(f"{what} must be a positive number of GiB (e.g. 8); got {value!r}. Use 'none' for no budget")
    return number


def budget_bytes(vram_budget: Any, device: torch.device | str) -> int | None:
    """The budget in bytes: "auto" reads the card's total memory now (None off CUDA); numbers are GiB."""
    value = parse_vram_budget(vram_budget)
    device = torch.device(device)
    if value == "auto":
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
        log.info("vram_budget auto: %s has %.1f GiB (%.1f GiB free)", device, total / GiB, free / GiB)
        return int(total)
    return None if value is None else int(value * GiB)


def _host_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _fused_norms(device: torch.device) -> bool:
    """Whether the decoders' LayerNorms will run as the fused kernel (no float32 copies) on ``device`` for half
    features (float32 decoders never do: ``_stages`` checks the element size)."""
    return device.type == "cuda" and vae_norm.fused_available()


def _stages(sizes: Mapping[str, ModelSize], pipeline_type: str, tokens: tuple[int, int],
            fused_norms: bool = False) -> list[tuple[str, str, Callable]]:  # fmt: skip
    """(stage, role, activation(batched_cfg, chunk_rows) -> bytes) for the roles of ``pipeline_type`` present in sizes."""
    p = pipeline_plan(pipeline_type)
    lr, hr = tokens
    final = hr if p.cascade else lr
    out: list[tuple[str, str, Callable]] = []

    def dit(stage: str, role: str, n: int) -> None:
        if role in sizes:
            out.append((stage, role, lambda b, r, s=sizes[role]: dit_activation_bytes(n * (2 if b else 1), s)))

    if IMAGE_COND in sizes:
        out.append(("condition", IMAGE_COND, lambda b, r: _SMALL_STAGE))
    if SS_FLOW in sizes:
        dit("structure", SS_FLOW, max(sizes[SS_FLOW].resolution, 1) ** 3)
    if SS_DECODER in sizes:
        out.append(("structure decode", SS_DECODER, lambda b, r: _SMALL_STAGE))
    for i, role in enumerate(p.shape_models):
        dit(f"shape {'LR' if p.cascade and i == 0 else 'flow'}", role, lr if i == 0 else hr)
    dit("material", p.tex_model, final)
    for role in SC_DECODERS:
        if role in sizes:
            out.append((f"decode {role.split('_')[0]}", role, lambda b, r, s=sizes[role]: decoder_activation_bytes(final, s, r, fused_norms=fused_norms and s.elem_bytes == 2)))
    return out


def plan_memory(sizes: Any, device: torch.device | str, vram_budget: Any, *, pipeline_type: str = "1024_cascade",
                tokens: tuple[int, int] | int | None = None, host_ram_bytes: int | None = None,
                prefetch: int = 1, dtype: torch.dtype | None = None, fp8: bool = False) -> MemoryPlan:  # fmt: skip
    """The cheapest plan whose estimate fits ``vram_budget`` ("auto", None, or GiB) on ``device``.

    sizes: ``weights.PipelineFiles``, or {role: ModelSize}. tokens: (first shape flow, last shape flow) latent
    tokens, or one int for both (default ``DEFAULT_TOKENS[pipeline_type]``). host_ram_bytes: default the
    machine's. dtype: block precision the loader will use (None = the files' own). fp8: the DiTs' block weights
    will be stored e4m3 (``nn/fp8.py``).
    """
    if pipeline_type not in PIPELINE_TYPES:
        raise InputError(f"pipeline_type must be one of {list(PIPELINE_TYPES)}; got {pipeline_type!r}")
    if not isinstance(sizes, Mapping):
        sizes = sizes_from_files(sizes, dtype, fp8)
    tok = DEFAULT_TOKENS[pipeline_type] if tokens is None else (tokens, tokens) if isinstance(tokens, int) else tuple(tokens)
    if len(tok) != 2 or any(not isinstance(t, int) or t < 1 for t in tok):
        raise InputError(f"tokens must be a positive int or a pair (first, last shape flow tokens); got {tokens!r}")
    stages = _stages(sizes, pipeline_type, tok, _fused_norms(torch.device(device)))
    roles = sorted({r for _, r, _ in stages})
    dits = tuple(r for r in roles if sizes[r].kind == "dit")
    decoders = tuple(r for r in roles if sizes[r].kind == "sc_decoder")
    budget = budget_bytes(vram_budget, device)
    all_weights = sum(sizes[r].weight_bytes for r in roles)

    def estimate(policy: str, batched: bool, stream: bool, chunk: int | None) -> tuple[StageEstimate, ...]:
        out = []
        for stage, role, act in stages:
            own = sizes[role].streamed_bytes(prefetch) if (stream and role in dits) else sizes[role].weight_bytes
            w = all_weights - sizes[role].weight_bytes + own if policy == "keep" else own
            out.append(StageEstimate(stage, role, w, act(batched, chunk)))
        return tuple(out)

    def make(policy, batched, stream, chunk, usable=None, fits=True) -> MemoryPlan:
        return MemoryPlan(policy, stream, chunk, batched, pipeline_type, budget, usable, prefetch,
                          dits if stream else (), decoders, estimate(policy, batched, stream, chunk), fits)  # fmt: skip

    if budget is None:
        return make("keep", True, False, None)
    usable = budget - max(GiB // 2, int(0.08 * budget))  # CUDA context, allocator fragmentation

    def peak(est, kinds) -> int:
        return max((s.total_bytes for s in est if sizes[s.role].kind in kinds), default=0)

    keep = estimate("keep", True, False, None)
    if max(s.total_bytes for s in keep) <= usable:
        result = make("keep", True, False, None, usable)
        graphs = _graphs_fit(result, sizes, False, usable)
        return dataclasses.replace(result, cuda_graphs=graphs, keep_graphs=graphs and _kept_graphs_fit(result, sizes, usable))
    ram = _host_ram() if host_ram_bytes is None else host_ram_bytes
    policy = "free" if ram is not None and all_weights > 0.7 * ram else "offload"
    fits = True
    for batched, stream in ((True, False), (False, False), (True, True), (False, True)):
        if peak(estimate(policy, batched, stream, None), ("dit",)) <= usable:
            break
    else:
        fits = False
    chunk = None
    if peak(estimate(policy, batched, stream, None), ("sc_decoder",)) > usable:
        # Largest chunk that fits; if none does, the largest with the lowest peak (the up blocks may dominate).
        tried = [(peak(estimate(policy, batched, stream, 2**k), ("sc_decoder",)), -(2**k)) for k in range(20, 13, -1)]
        fitting = [t for t in tried if t[0] <= usable]
        chunk = -(fitting[0] if fitting else min(tried))[1]
    result = make(policy, batched, stream, chunk, usable)
    fits = fits and result.peak_bytes <= usable
    # Models leave the device after their stage here, and kept graphs with them (Components releases them).
    result = dataclasses.replace(result, fits=fits, cuda_graphs=_graphs_fit(result, sizes, stream, usable), keep_graphs=False)
    (log.info if fits else log.warning)("memory plan: %s", result.summary())
    return result


# While a sampling loop replays CUDA graphs (nn/cuda_graphs.py), the graphs' pool keeps the activations of the
# batched pair (B = 2) while the first, eager call of the single-branch key (B = 1) allocates its own: up to 1.5x
# the estimate of an eager DiT stage.
GRAPH_HEADROOM = 1.5


def _graphs_fit(plan: MemoryPlan, sizes: Mapping[str, ModelSize], stream: bool, usable: int) -> bool:
    """Whether every DiT stage still fits with GRAPH_HEADROOM x its activations (never with streamed blocks)."""
    if stream:
        return False
    dits = [s for s in plan.stages if sizes[s.role].kind == "dit"]
    return all(s.weight_bytes + GRAPH_HEADROOM * s.activation_bytes <= usable for s in dits)


def _kept_graphs_fit(plan: MemoryPlan, sizes: Mapping[str, ModelSize], usable: int) -> bool:
    """Whether every stage after the structure stage still fits with that stage's graphs kept for the next generation
    (GRAPH_HEADROOM x its activations; nn/kept_graphs.py), DiT stages with their own graphs."""
    ss = [i for i, s in enumerate(plan.stages) if s.role == SS_FLOW]
    if not ss:
        return True
    kept = int(GRAPH_HEADROOM * plan.stages[ss[0]].activation_bytes)
    for s in plan.stages[ss[0] + 1 :]:
        own = s.weight_bytes + GRAPH_HEADROOM * s.activation_bytes if sizes[s.role].kind == "dit" else s.total_bytes
        if own + kept > usable:
            return False
    return True


# ---------------------------------------------------------------------------------------------- components
def components_for(files: Any, device: torch.device | str, dtype: torch.dtype | None, vram_budget: Any = None, *,
                   policy: Policy = "keep", pipeline_type: str | None = None, tokens: Any = None,
                   fp8: bool = False) -> Components:  # fmt: skip
    """``Components`` for a ``weights.PipelineFiles``: lazy loaders for every role (+ DINOv3), following the
    plan for ``vram_budget`` (None: no plan, ``policy`` as given). A plan's policy applies when stricter than
    ``policy`` ("keep" < "offload" < "free"). Streamed DiTs are read into CPU memory, never whole onto the device.
    fp8: every DiT's block Linear layers are quantised to e4m3 right after loading (``nn/fp8.py``).
    """
    from ..checkpoints import load_model
    from ..conditioning import DinoV3Conditioner

    if policy not in _POLICY_ORDER:
        raise InputError(f"policy must be one of {list(_POLICY_ORDER)}; got {policy!r}")
    device = torch.device(device)
    memory_plan = None
    if parse_vram_budget(vram_budget) is not None:
        ptype = pipeline_type or getattr(files, "default_pipeline_type", None) or "1024_cascade"
        memory_plan = plan_memory(files, device, vram_budget, pipeline_type=ptype, tokens=tokens, dtype=dtype, fp8=fp8)
        if memory_plan.budget_bytes is None:
            memory_plan = None  # "auto" off CUDA: nothing to fit
        else:
            policy = max(policy, memory_plan.policy, key=_POLICY_ORDER.index)
            prefer_expandable_segments(device)
    streamed = set(memory_plan.stream_roles) if memory_plan is not None else set()

    if fp8:
        check_fp8_device(device)

    def loader(role: str):
        where = torch.device("cpu") if role in streamed else device
        return lambda: load_model(files.models[role], device=where, dtype=dtype, fp8=fp8)

    loaders: dict[str, Callable[[], Any]] = {role: loader(role) for role in files.models}
    if files.dinov3_path is not None:
        loaders[IMAGE_COND] = lambda: DinoV3Conditioner.from_folder(files.dinov3_path, device=device)
    return Components(loaders, device, policy=policy, plan=memory_plan)


__all__ = [
    "DEFAULT_TOKENS", "DINOV3_VITL16_BYTES", "MemoryPlan", "ModelSize", "StageEstimate", "budget_bytes", "components_for",
    "decoder_activation_bytes", "dit_activation_bytes", "parse_vram_budget", "plan_memory", "prefer_expandable_segments",
    "sizes_from_files",
    "sizes_from_manifests",
]  # fmt: skip
