"""TRELLIS.2 components under ComfyUI's model management, and the models/trellis2/ folder.

``ComfyComponents`` implements the engine's ``ComponentSource`` protocol (trellis2_core/pipeline/components.py):
each role's network is read from disk once per TRELLIS2_MODEL handle (onto the offload device), wrapped in a
``comfy.model_patcher.ModelPatcher``, and ``use(role)`` asks ``comfy.model_management.load_models_gpu`` for it.
So a component is on the GPU only while ComfyUI lets it be: loaded when a stage needs it, evicted (moved back to
the offload device) when another model needs the memory, and never loaded twice, because the handle owns its
patchers and the engine never holds a model between stages.

Models are loaded fully (``force_full_load``): ComfyUI's partial "lowvram" loading needs every weight-holding
module to be one of its casting ops, and our sparse convolutions, norms and modulation vectors are not.

With a VRAM budget (``vram_budget``: "auto" = the card's memory, or GiB) the handle carries a ``MemoryPlan``
(trellis2_core/pipeline/memory.py). Then each load asks ComfyUI for the stage's activation estimate too
(``memory_required``, so other models are evicted before the stage rather than after an OOM), each network is
offloaded as soon as its stage ends, the DiTs the plan names are streamed block by block from CPU memory instead
of being loaded (ComfyUI only frees room for them), and the decoders run their ConvNeXt blocks in chunks.

Texturing (Trellis2Retexture): the texturing pipeline needs one role pipeline.json lacks, the shape SC-VAE
encoder. The same handle resolves ``texturing_pipeline.json`` of its folder (or repo) on first need
(``ComfyComponents.require_texturing``) and adds only the roles pipeline.json lacks; the texture flows and
decoder it shares with the image pipeline keep their one patcher each, so nothing is held twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..trellis2_core.checkpoints import load_model
from ..trellis2_core.conditioning import DinoV3Conditioner
from ..trellis2_core.errors import CheckpointError, InputError
from ..trellis2_core.models.decoder_chunking import chunk_decoder
from ..trellis2_core.nn.fp8 import check_fp8_device
from ..trellis2_core.nn.kept_graphs import release_graphs
from ..trellis2_core.nn.streaming import stream_blocks, streamer_of, unstream
from ..trellis2_core.pipeline import Trellis2Pipeline, default_dtype
from ..trellis2_core.pipeline.components import PlanSwitches
from ..trellis2_core.pipeline.memory import MemoryPlan, parse_vram_budget, plan_memory
from ..trellis2_core.pipeline.trellis2 import IMAGE_COND
from ..trellis2_core.weights import DEFAULT_REPO, PIPELINE_FILE, TEXTURING_FILE, ModelFiles, PipelineFiles, resolve_pipeline

log = logging.getLogger(__name__)

FOLDER_NAME = "trellis2"  # folder_paths key and default folder models/trellis2/
DOWNLOAD_CHOICE = f"{DEFAULT_REPO} (download)"
HF_CACHE = "hf_cache"  # downloads land in models/trellis2/hf_cache/ (no pipeline.json there: never listed)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICE_POLICIES = ("auto", "keep on gpu", "cpu")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ folders
def register_model_folder() -> None:
    """Make ``models/trellis2/`` a ComfyUI model folder (idempotent; extra_model_paths.yaml may add more)."""
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    if default not in folder_paths.folder_names_and_paths.get(FOLDER_NAME, ([], set()))[0]:
        folder_paths.add_model_folder_path(FOLDER_NAME, default)


def model_roots() -> list[str]:
    register_model_folder()
    return list(folder_paths.get_folder_paths(FOLDER_NAME))


def pipeline_choices() -> list[str]:
    """Sub-folders of every models/trellis2 root that hold a pipeline.json, then the download choice."""
    names: set[str] = set()
    for root in model_roots():
        if os.path.isdir(root):
            names.update(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, PIPELINE_FILE)))
    return sorted(names) + [DOWNLOAD_CHOICE]


def _local_folder(name: str) -> str:
    roots = model_roots()
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise InputError(
        f"pipeline: no folder {name!r} in {roots}; put the TRELLIS.2 snapshot (pipeline.json, ckpts/) in "
        f"{os.path.join(roots[0], name)} or choose {DOWNLOAD_CHOICE!r}"
    )


# ------------------------------------------------------------------------------------------------ settings
def resolve_devices(policy: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a device policy (see DEVICE_POLICIES)."""
    if policy == "auto":
        return mm.get_torch_device(), mm.unet_offload_device()
    if policy == "keep on gpu":
        device = mm.get_torch_device()
        return device, device
    if policy == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    raise InputError(f"device_policy must be one of {list(DEVICE_POLICIES)}; got {policy!r}")


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(block dtype for the TRELLIS.2 networks, dtype for DINOv3).

    auto: the released precision on CUDA (bf16 DiTs, fp16 VAEs: dtype None lets each checkpoint choose) and
    float32 elsewhere; DINOv3 stays float32 as in the reference unless a half precision is asked for.
    """
    if precision == "auto":
        return default_dtype(device), torch.float32
    if precision not in _DTYPES:
        raise InputError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise InputError("precision: fp16 is not supported on the CPU (torch lacks half kernels there); choose auto, fp32 or bf16")
    return _DTYPES[precision], _DTYPES[precision]


# ------------------------------------------------------------------------------------------------ components
class _Managed(torch.nn.Module):
    """The module ComfyUI manages. ModelPatcher writes bookkeeping attributes (``device``, ...) onto the module it
    holds; this container takes them, so engine and transformers modules (whose ``device`` is read-only) stay as built.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


class _Patcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher that frees the CUDA graphs kept for its network (the SS flow's, ``nn/kept_graphs.py``) before
    ComfyUI moves the weights they read: on a full unload (``detach`` that unpatches) and on a partial one
    (``partially_unload``, when another model needs the memory).

    ``detach(unpatch_all=False)`` leaves the weights where they are: ComfyUI calls it every time a loaded model is
    requested again (``load_models_gpu`` detaches and re-inserts it), so releasing there would throw the graphs
    away before every generation. (Graphs whose weights did move are dropped anyway when a loop looks for them:
    ``kept_graphs.take`` compares the weights' addresses.)"""

    def detach(self, unpatch_all=True):
        if unpatch_all:
            release_graphs(self.model.module)
        return super().detach(unpatch_all)

    def partially_unload(self, *args, **kwargs):
        release_graphs(self.model.module)
        return super().partially_unload(*args, **kwargs)


class ComfyComponents(PlanSwitches):
    """``ComponentSource`` backed by ComfyUI's model management; one per TRELLIS2_MODEL handle."""

    def __init__(self, files: PipelineFiles, *, load_device: torch.device, offload_device: torch.device,
                 dtype: torch.dtype | None, dino_dtype: torch.dtype, plan: MemoryPlan | None = None,
                 texturing: Callable[[], PipelineFiles] | None = None, fp8: bool = False):  # fmt: skip
        self.files = files
        self._texturing = texturing  # resolves texturing_pipeline.json (see require_texturing)
        self._extra_models: dict[str, ModelFiles] = {}
        self.plan = plan
        self.device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.dtype = dtype
        self.dino_dtype = dino_dtype
        self.fp8 = fp8  # the DiTs' block Linear weights stored e4m3 (trellis2_core/nn/fp8.py)
        self._patchers: dict[str, comfy.model_patcher.ModelPatcher] = {}

    def has(self, role: str) -> bool:
        return role in self._models() or (role == IMAGE_COND and self.files.dinov3_path is not None)

    def _models(self) -> dict[str, ModelFiles]:
        return {**self.files.models, **self._extra_models}

    def require_texturing(self, roles: tuple[str, ...] = ("shape_slat_encoder", "tex_slat_decoder")) -> None:
        """Make the texturing roles usable: resolve texturing_pipeline.json once (files only, no weights read).

        Raises CheckpointError naming the missing file and where to put it.
        """
        if all(r in self._models() for r in roles):
            return
        if self._texturing is None:
            raise CheckpointError(f"the pipeline in {self.files.source} has no {TEXTURING_FILE}; texturing needs its roles {list(roles)}")
        try:
            tex = self._texturing()
        except CheckpointError as e:
            raise CheckpointError(
                f"retexturing needs the texturing pipeline ({TEXTURING_FILE}: the shape SC-VAE encoder "
                f"ckpts/shape_enc_next_dc_f16c32_fp16) beside pipeline.json in {self.files.source}; {e}"
            ) from e
        self._extra_models.update({r: m for r, m in tex.models.items() if r not in self.files.models})
        missing = [r for r in roles if r not in self._models()]
        if missing:
            raise CheckpointError(f"{tex.config_path} lists no {missing}; expected the official texturing pipeline's roles")

    def patcher(self, role: str) -> comfy.model_patcher.ModelPatcher:
        """The role's ModelPatcher, reading the checkpoint on first use (onto the offload device)."""
        patcher = self._patchers.get(role)
        if patcher is None:
            patcher = _Patcher(_Managed(self._read(role)), self.device, self.offload_device)
            self._patchers[role] = patcher
        return patcher

    def _read(self, role: str) -> torch.nn.Module:
        if role == IMAGE_COND:
            if self.files.dinov3_path is None:
                raise CheckpointError(f"the pipeline in {self.files.source} has no DINOv3 folder (dinov3/config.json + model.safetensors)")
            log.info("reading DINOv3 from %s", self.files.dinov3_path)
            return DinoV3Conditioner.from_folder(self.files.dinov3_path, device=self.offload_device, dtype=self.dino_dtype).model
        models = self._models()
        if role not in models:
            raise CheckpointError(
                f"the pipeline in {self.files.source} has no '{role}' model (it has {sorted(self.files.models)}); "
                "choose a pipeline type whose models the folder contains, or complete the folder"
            )
        log.info("reading %s from %s", role, models[role].weights_path)
        return load_model(models[role], device=self.offload_device, dtype=self.dtype, fp8=self.fp8)

    def _activation_bytes(self, role: str) -> int:
        if self.plan is None:
            return 0
        return max((s.activation_bytes for s in self.plan.stages if s.role == role), default=0)

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[torch.nn.Module]:
        patcher = self.patcher(role)
        plan = self.plan
        if plan is not None and plan.stream_blocks and role in plan.stream_roles:
            with self._streamed(role, patcher.model.module) as module:
                yield module
            return
        mm.load_models_gpu([patcher], memory_required=self._activation_bytes(role), force_full_load=True)
        module = patcher.model.module
        if plan is not None and role in plan.decoder_roles:
            chunk_decoder(module, plan.decoder_chunk_voxels)
        try:
            # The conditioning stage calls .encode on the DINOv3 wrapper; the wrapper holds no state of its own.
            yield DinoV3Conditioner(module) if role == IMAGE_COND else module
        finally:
            if plan is not None and plan.policy != "keep":
                self._unload(patcher)

    @contextlib.contextmanager
    def _streamed(self, role: str, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """A DiT that stays in CPU memory (ComfyUI keeps it unloaded) with its blocks streamed to the device."""
        stage = max((s.total_bytes for s in self.plan.stages if s.role == role), default=0)  # streamed weights + activations
        mm.free_memory(stage, self.device)
        stream_blocks(module, self.device, prefetch=self.plan.prefetch)
        try:
            yield module
        finally:
            streamer_of(module).release()
            unstream(module)
            module.to(self.offload_device)
            mm.soft_empty_cache()

    @staticmethod
    def _unload(patcher: comfy.model_patcher.ModelPatcher) -> None:
        """Offload one network now (the budget's "offload after each stage"), leaving other models loaded."""
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            loaded = mm.current_loaded_models[i]
            if loaded.model is patcher and loaded.model_unload():
                mm.current_loaded_models.pop(i)
        mm.soft_empty_cache()

    @property
    def loaded_roles(self) -> tuple[str, ...]:
        """Roles read from disk so far (for tests and logs)."""
        return tuple(self._patchers)


def load_pipeline(choice: str, precision: str = "auto", device_policy: str = "auto", allow_download: bool = False,
                  vram_budget: str | float | None = "auto", fp8: bool = False) -> Trellis2Pipeline:  # fmt: skip
    """The TRELLIS2_MODEL handle: files resolved now (errors name every missing file), networks read on first use.

    choice: a folder name from ``pipeline_choices()`` or DOWNLOAD_CHOICE (official weights into models/trellis2/hf_cache).
    allow_download: for a local folder, fetch parts it lacks (the structure decoder, DINOv3) from Hugging Face.
    vram_budget: "auto" (the card's memory; nothing on the CPU), "none", or GiB (a number applies on any device).
    The plan is made for the pipeline's default type (1024_cascade for the official one), the largest it runs.
    fp8: store the flow transformers' block weights as float8 e4m3 (half their memory; FP8 GEMMs on RTX 40xx /
    Ada / Hopper GPUs, emulated elsewhere; ``trellis2_core/nn/fp8.py``).
    """
    budget = parse_vram_budget(vram_budget)  # bad values fail before any file is resolved
    register_model_folder()
    cache_dir = os.path.join(model_roots()[0], HF_CACHE)
    if choice == DOWNLOAD_CHOICE:
        source, allow_download = DEFAULT_REPO, True
    else:
        source = _local_folder(choice)
    files = resolve_pipeline(source, allow_download=allow_download, cache_dir=cache_dir)

    def texturing() -> PipelineFiles:  # resolved only when a texturing node first needs it
        return resolve_pipeline(source, allow_download=allow_download, cache_dir=cache_dir, config_file=TEXTURING_FILE, dinov3=False)

    load_device, offload_device = resolve_devices(device_policy)
    dtype, dino_dtype = resolve_precision(precision, load_device)
    if fp8:
        check_fp8_device(load_device)
    plan = None
    if budget is not None:
        plan = plan_memory(files, load_device, budget, pipeline_type=files.default_pipeline_type or "1024_cascade", dtype=dtype,
                           fp8=fp8)  # fmt: skip
        plan = plan if plan.budget_bytes is not None else None
    components = ComfyComponents(files, load_device=load_device, offload_device=offload_device, dtype=dtype,
                                 dino_dtype=dino_dtype, plan=plan, texturing=texturing, fp8=fp8)  # fmt: skip
    return Trellis2Pipeline(files, components)


__all__ = [
    "DEVICE_POLICIES",
    "DOWNLOAD_CHOICE",
    "PRECISIONS",
    "ComfyComponents",
    "load_pipeline",
    "pipeline_choices",
    "register_model_folder",
    "resolve_devices",
    "resolve_precision",
]
