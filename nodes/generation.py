"""Generation stages as nodes: model loading, image conditioning, sparse structure, geometry, material.

Each node validates its widgets through the engine (whose InputError / ConfigError / CheckpointError messages reach
the ComfyUI UI as they are), makes one engine call (plus the decode of its own latent) and returns new objects.

Random stream: the reference draws all noise from one generator seeded once (SPEC 14). The structure node takes
the seed; every later stage's result carries the generator state after its draws (``rng_state``), and the next
node continues from it when its own seed is -1, so a chain of nodes reproduces the single-call pipeline exactly.
A seed >= 0 on a later node starts a fresh stream there (vary one stage while keeping the earlier ones).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..trellis2_core.errors import InputError
from ..trellis2_core.image import from_comfy, to_comfy
from ..trellis2_core.pipeline import PIPELINE_TYPES, rng
from ..trellis2_core.pipeline.decode import decode_material
from ..trellis2_core.pipeline.shape import MAX_TOKENS
from . import model_management as mgmt
from .runtime import cancellable, progress_bar, should_stop
from .sockets import CATEGORY, ConditioningSocket, MaterialLatentSocket, ModelSocket, OVoxelSocket, ShapeLatentSocket
from .sockets import StructureSocket

MAX_SEED = rng.MAX_SEED
RESOLUTIONS = {"512 + 1024": (512, 1024), "512": (512,), "1024": (1024,)}
MASK_CONVENTIONS = {"1 = background (LoadImage MASK)": False, "1 = object (segmentation MASK)": True}
CONTINUE_TIP = (
    "-1 (default): continue the random stream of the input, exactly as one pipeline run with the structure node's "
    "seed would. 0 or more: start a fresh stream with this seed at this stage (earlier stages stay as they are)."
)


def _model_input() -> io.Input:
    return ModelSocket.Input("model", tooltip="TRELLIS.2 model handle from Trellis2LoadModel.")


def _cond_input() -> io.Input:
    return ConditioningSocket.Input("conditioning", tooltip="DINOv3 image tokens from Trellis2Conditioning.")


def _pipeline_type_input() -> io.Input:
    return io.Combo.Input(
        "pipeline_type", options=list(PIPELINE_TYPES), default="1024_cascade",
        tooltip="Final grid and models: '512' (fast), '1024' (64^3 structure, one 1024 flow), '1024_cascade' (official "
                "default: 512 then 1024), '1536_cascade' (may drop to a lower grid above the token cap). Use the same "
                "value on the structure and geometry nodes.",
    )  # fmt: skip


def _sampler_inputs(steps: int, strength: float, rescale: float, interval: tuple[float, float], rescale_t: float) -> list[io.Input]:
    """Sampler widgets with the official pipeline.json values of the stage as defaults."""
    return [
        io.Int.Input("steps", default=steps, min=1, max=200, tooltip="Euler sampling steps (official 12)."),
        io.Float.Input("guidance_strength", default=strength, min=0.0, max=30.0, step=0.1,
                       tooltip=f"Classifier-free guidance strength; 1 disables guidance (official {strength})."),
        io.Float.Input("guidance_rescale", default=rescale, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Blend towards the std-rescaled guided prediction; 0 = off (official {rescale})."),
        io.Float.Input("guidance_interval_start", default=interval[0], min=0.0, max=1.0, step=0.01,
                       tooltip=f"Guidance applies while t (1 -> 0) lies in [start, end] (official {interval[0]})."),
        io.Float.Input("guidance_interval_end", default=interval[1], min=0.0, max=1.0, step=0.01,
                       tooltip=f"Upper end of the guidance interval in t (official {interval[1]})."),
        io.Float.Input("rescale_t", default=rescale_t, min=0.1, max=20.0, step=0.1,
                       tooltip=f"Time-grid warp; > 1 spends more steps near t = 1 (official {rescale_t})."),
    ]  # fmt: skip


def _params(model, stage: str, steps, guidance_strength, guidance_rescale, guidance_interval_start, guidance_interval_end, rescale_t):
    return model.sampler_params(
        stage, steps=steps, guidance_strength=guidance_strength, guidance_rescale=guidance_rescale,
        guidance_interval=(guidance_interval_start, guidance_interval_end), rescale_t=rescale_t,
    )  # fmt: skip


def _seed_input() -> io.Input:
    return io.Int.Input("seed", default=-1, min=-1, max=MAX_SEED, tooltip=CONTINUE_TIP)


def _generator(seed: int, upstream, what: str):
    """A fresh stream for seed >= 0, else the continuation of ``upstream.rng_state``."""
    if seed >= 0:
        return rng.generator(seed=seed)
    if getattr(upstream, "rng_state", None) is None:
        raise InputError(f"seed: -1 continues the random stream of {what}, but it carries none; set a seed >= 0")
    return rng.generator(state=upstream.rng_state)


class Trellis2LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = mgmt.pipeline_choices()
        return io.Schema(
            node_id="Trellis2LoadModel", display_name="TRELLIS.2 Load Model", category=CATEGORY,
            description="Resolve a TRELLIS.2 pipeline; its networks load on first use, through ComfyUI's model management.",
            inputs=[
                io.Combo.Input("pipeline", options=choices, default=choices[0],
                               tooltip="A folder under models/trellis2/ holding pipeline.json and ckpts/ (official layout), "
                                       f"or '{mgmt.DOWNLOAD_CHOICE}' to fetch the official weights into models/trellis2/"
                                       f"{mgmt.HF_CACHE} (DINOv3 is gated: accept its licence and log in first)."),
                io.Combo.Input("precision", options=list(mgmt.PRECISIONS), default="auto",
                               tooltip="auto: released precision on CUDA (bf16 flows, fp16 decoders), fp32 on CPU/Apple. "
                                       "fp32 is the most exact, fp16/bf16 the lightest."),
                io.Combo.Input("device_policy", options=list(mgmt.DEVICE_POLICIES), default="auto",
                               tooltip="auto: each network goes to the GPU when its stage runs and back to the CPU when "
                                       "ComfyUI needs the memory. keep on gpu: never offloaded. cpu: everything on the CPU."),
                io.Boolean.Input("allow_download", default=False,
                                 tooltip="For a local folder: download parts it lacks (the structure decoder from "
                                         "microsoft/TRELLIS-image-large, DINOv3) from Hugging Face. Off: only local files."),
                io.String.Input("vram_budget", default="auto",
                                tooltip="GPU memory the TRELLIS.2 stages may use: 'auto' (this card's memory), a number of "
                                        "GiB (e.g. 8 or 11.5), or 'none'. Under a tight budget each network is offloaded "
                                        "when its stage ends, the flow transformers are streamed block by block from CPU "
                                        "memory, and the decoders work in chunks; the plan is logged."),
                io.Boolean.Input("fp8", default=False, optional=True,
                                 tooltip="Store the flow transformers' block weights as float8 (e4m3, one scale per "
                                         "output channel): half their memory, and faster on GPUs with FP8 units (RTX 40xx, "
                                         "Ada, Hopper; emulated elsewhere). Slightly different results from the released "
                                         "bf16; off reproduces the reference."),
            ],
            outputs=[ModelSocket.Output(display_name="model")],
        )  # fmt: skip

    @classmethod
    def execute(cls, pipeline, precision, device_policy, allow_download, vram_budget="auto", fp8=False) -> io.NodeOutput:
        return io.NodeOutput(mgmt.load_pipeline(pipeline, precision, device_policy, allow_download, vram_budget, fp8))


class Trellis2Conditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2Conditioning", display_name="TRELLIS.2 Image Conditioning", category=CATEGORY,
            description="Crop the object to a square on black (as the reference) and encode it with DINOv3.",
            inputs=[
                _model_input(),
                io.Image.Input("image", tooltip="One image (batch of 1), RGB or RGBA; the object on a plain background. Several "
                                              "views of one object: use Trellis2MultiViewConditioning."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional foreground mask of the image (replaces its alpha). Without a mask the image "
                                      "needs an alpha channel."),
                io.Combo.Input("mask_convention", options=list(MASK_CONVENTIONS), default=next(iter(MASK_CONVENTIONS)),
                               tooltip="What 1 means in the mask: LoadImage's MASK is 1 where the picture is transparent "
                                       "(background); segmentation nodes give 1 on the object."),
                io.Combo.Input("resolutions", options=list(RESOLUTIONS), default="512 + 1024",
                               tooltip="DINOv3 token grids to compute: the structure stage needs 512; every pipeline type "
                                       "except '512' also needs 1024."),
            ],
            outputs=[
                ConditioningSocket.Output(display_name="conditioning"),
                io.Image.Output(display_name="preprocessed", tooltip="The square crop the model sees."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, image, mask_convention, resolutions, mask=None) -> io.NodeOutput:
        if mask_convention not in MASK_CONVENTIONS:
            raise InputError(f"mask_convention must be one of {list(MASK_CONVENTIONS)}; got {mask_convention!r}")
        if resolutions not in RESOLUTIONS:
            raise InputError(f"resolutions must be one of {list(RESOLUTIONS)}; got {resolutions!r}")
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] > 1:
            raise InputError(
                f"image: expected one image; got a batch of {image.shape[0]}. For several views of one object use "
                "TRELLIS.2 Multi-View Conditioning (Trellis2MultiViewConditioning); else pick one image ('ImageFromBatch')"
            )
        crop = from_comfy(image, mask, mask_is_foreground=MASK_CONVENTIONS[mask_convention] if mask is not None else None)
        cond = model.condition(crop, RESOLUTIONS[resolutions], preprocess=False)
        return io.NodeOutput(cond, to_comfy(crop))


class Trellis2SparseStructure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2SparseStructure", display_name="TRELLIS.2 Sparse Structure", category=CATEGORY,
            description="Stage 1: which voxels of a 32^3 / 64^3 grid the object occupies.",
            inputs=[
                _model_input(), _cond_input(), _pipeline_type_input(),
                io.Int.Input("seed", default=42, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the whole generation's random stream (the reference's default is 42); "
                                     "later stages continue this stream unless given their own seed."),
                *_sampler_inputs(12, 7.5, 0.7, (0.6, 1.0), 5.0),
            ],
            outputs=[StructureSocket.Output(display_name="structure")],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, conditioning, pipeline_type, seed, **sampler) -> io.NodeOutput:
        params = _params(model, "sparse_structure", **sampler)
        with cancellable():
            structure = model.structure(conditioning, pipeline_type=pipeline_type, generator=rng.generator(seed=seed),
                                        params=params, progress=progress_bar(), should_stop=should_stop)  # fmt: skip
        return io.NodeOutput(structure)


class Trellis2Geometry(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2Geometry", display_name="TRELLIS.2 Geometry", category=CATEGORY,
            description="Stage 2: the shape latent on the structure (cascade: 512 then 1024), decoded to an O-Voxel.",
            inputs=[
                _model_input(), _cond_input(),
                StructureSocket.Input("structure", tooltip="Occupied voxels from Trellis2SparseStructure."),
                _pipeline_type_input(),
                *_sampler_inputs(12, 7.5, 0.5, (0.6, 1.0), 3.0),
                _seed_input(),
                io.Int.Input("max_tokens", default=MAX_TOKENS, min=1024, max=1 << 20, step=1024,
                             tooltip="1536 cascade only: above this many voxels the grid drops by 128 until it fits "
                                     f"(official {MAX_TOKENS}); lower it to save memory."),
            ],
            outputs=[
                ShapeLatentSocket.Output(display_name="shape_latent"),
                OVoxelSocket.Output(display_name="geometry", tooltip="Decoded geometry O-Voxel (no PBR yet)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, conditioning, structure, pipeline_type, seed, max_tokens, **sampler) -> io.NodeOutput:
        params = _params(model, "shape_slat", **sampler)
        generator = _generator(seed, structure, "the structure")
        with cancellable():
            shape = model.shape(conditioning, structure, pipeline_type=pipeline_type, generator=generator, params=params,
                                max_tokens=max_tokens, progress=progress_bar(), should_stop=should_stop)  # fmt: skip
        return io.NodeOutput(shape, model.decode(shape))


class Trellis2Material(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2Material", display_name="TRELLIS.2 Material (PBR)", category=CATEGORY,
            description="Stage 3: the PBR material latent on the shape's voxels, decoded onto the geometry O-Voxel.",
            inputs=[
                _model_input(), _cond_input(),
                ShapeLatentSocket.Input("shape_latent", tooltip="Shape latent from Trellis2Geometry."),
                OVoxelSocket.Input("geometry", tooltip="The geometry O-Voxel decoded from the same shape latent (Trellis2Geometry)."),
                *_sampler_inputs(12, 1.0, 0.0, (0.6, 0.9), 3.0),
                _seed_input(),
            ],
            outputs=[
                MaterialLatentSocket.Output(display_name="material_latent"),
                OVoxelSocket.Output(display_name="o_voxel", tooltip="Geometry with base colour, metallic, roughness, alpha."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, conditioning, shape_latent, geometry, seed, **sampler) -> io.NodeOutput:
        params = _params(model, "tex_slat", **sampler)
        generator = _generator(seed, shape_latent, "the shape latent")
        with cancellable():
            material = model.material(conditioning, shape_latent, generator=generator, params=params,
                                      progress=progress_bar(), should_stop=should_stop)  # fmt: skip
        return io.NodeOutput(material, decode_material(model.components, material, geometry))


NODES = [Trellis2LoadModel, Trellis2Conditioning, Trellis2SparseStructure, Trellis2Geometry, Trellis2Material]
