"""The image-to-3D pipeline as one object: the stages of SPEC.md section 14 behind a small API.

    pipe = Trellis2Pipeline.from_pretrained("microsoft/TRELLIS.2-4B", device="cuda")
    result = pipe.generate(Image.open("chair.png"), seed=42, pipeline_type="1024_cascade")
    vertices, faces = result.ovoxel.to_mesh()

Each stage is also a method (``condition``, ``structure``, ``shape``, ``material``, ``decode``) so the ComfyUI
nodes and the CLI call exactly the same code. Stages take their inputs and return new objects.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from ..checkpoints import read_model_config
from ..errors import ConfigError, InputError
from ..image import preprocess_image
from ..mesh.mesh import Mesh
from ..ovoxel.ovoxel import OVoxel
from ..sampling import SamplerParams
from ..weights import DEFAULT_REPO, PipelineFiles, resolve_pipeline
from . import rng
from .components import ComponentSource, Policy
from .memory import components_for
from .decode import decode_material, decode_shape
from .material import sample_material, tex_role
from .multiview import stack_views
from .retexture import Retexture, check_resolution, retexture_mesh
from .shape import MAX_TOKENS, sample_shape
from .structure import sample_structure
from .types import PIPELINE_TYPES, Conditioning, MaterialLatent, ShapeLatent, Structure, plan

IMAGE_COND = "image_cond_model"
STAGES = ("sparse_structure", "shape_slat", "tex_slat")
Progress = Callable[[int, int], None]


def default_dtype(device: torch.device) -> torch.dtype | None:
    """Block precision per device: the released one (bf16 DiTs, fp16 VAEs) on CUDA, float32 elsewhere."""
    return None if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Generation:
    """Everything one ``generate`` call produced; ``ovoxel`` holds geometry and PBR attributes."""

    ovoxel: OVoxel
    structure: Structure
    shape: ShapeLatent
    material: MaterialLatent
    conditioning: Conditioning


class Trellis2Pipeline:
    def __init__(self, files: PipelineFiles, components: ComponentSource):
        self.files = files
        self.components = components

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = DEFAULT_REPO,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        policy: Policy = "keep",
        vram_budget: float | str | None = None,
        pipeline_type: str | None = None,
        allow_download: bool = True,
        roles: Iterable[str] | None = None,
        fp8: bool = False,
        **resolve_kwargs: Any,
    ) -> Trellis2Pipeline:
        """Resolve (and download if needed) the pipeline's files; models load lazily on first use.

        source: a local folder in the official layout or a Hugging Face repo id. dtype: block precision
        (None = released precision on CUDA, float32 on CPU/MPS). policy: see ``Components``.
        vram_budget: None (no plan), "auto" (this card's memory) or GiB: plans offloading, DiT block streaming
        and chunked decoding so ``pipeline_type`` (default: the snapshot's) fits (``pipeline/memory.py``).
        fp8: store the flow DiTs' block weights as float8 e4m3 (``nn/fp8.py``: half their memory, FP8 GEMMs on
        GPUs with compute capability >= 8.9, emulated elsewhere; not the reference's numerics).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype if dtype is not None else default_dtype(device)
        files = resolve_pipeline(source, allow_download=allow_download, roles=roles, **resolve_kwargs)
        components = components_for(files, device, dtype, vram_budget, policy=policy, pipeline_type=pipeline_type, fp8=fp8)
        return cls(files, components)

    # ------------------------------------------------------------------------------------------- settings
    def sampler_params(self, stage: str, **overrides: Any) -> SamplerParams:
        """The pipeline.json defaults of ``stage`` ('sparse_structure', 'shape_slat', 'tex_slat'), overridable."""
        if stage not in STAGES:
            raise InputError(f"stage must be one of {list(STAGES)}; got {stage!r}")
        spec = self.files.samplers.get(f"{stage}_sampler")
        if spec is None:
            raise ConfigError(
                f"{self.files.config_path} has no {stage}_sampler entry (it has {sorted(self.files.samplers)}); load the "
                f"pipeline.json that runs the '{stage}' stage (texturing_pipeline.json only samples the texture)"
            )
        entry = {"name": spec.name, "args": dict(spec.args), "params": dict(spec.params)}
        return SamplerParams.from_pipeline_entry(entry, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def default_pipeline_type(self) -> str:
        return self.files.default_pipeline_type or "1024_cascade"

    # ------------------------------------------------------------------------------------------- stages
    @torch.no_grad()
    def condition(self, image: Image.Image | Sequence[Image.Image], resolutions: Iterable[int] = (512, 1024), *,
                  preprocess: bool = True, multiview_mode: str = "concat") -> Conditioning:  # fmt: skip
        """DINOv3 tokens [V, L, C] of one image (V = 1) or of several views of one object, at each resolution.

        Each image is cropped and premultiplied first (RGBA). multiview_mode: how the stages combine V > 1
        views ("concat", "average", "alternate"; see pipeline/multiview.py).
        """
        images = [image] if isinstance(image, Image.Image) else list(image)
        if preprocess:
            images = [preprocess_image(im) for im in images]
        tokens = {}
        with self.components.use(IMAGE_COND) as dino:
            for res in sorted(set(resolutions)):
                tokens[res] = stack_views([dino.encode(im, res).float() for im in images])
        return Conditioning(tokens=tokens, multiview_mode=multiview_mode)

    def structure(self, cond: Conditioning, *, pipeline_type: str, generator: torch.Generator, params: SamplerParams | None = None,
                  progress: Progress | None = None, should_stop=None) -> Structure:  # fmt: skip
        return sample_structure(
            self.components, cond, resolution=plan(pipeline_type).structure_resolution,
            params=params or self.sampler_params("sparse_structure"), generator=generator,
            progress=progress, should_stop=should_stop,
        )  # fmt: skip

    def shape(self, cond: Conditioning, structure: Structure, *, pipeline_type: str, generator: torch.Generator,
              params: SamplerParams | None = None, max_tokens: int = MAX_TOKENS, progress: Progress | None = None,
              should_stop=None) -> ShapeLatent:  # fmt: skip
        return sample_shape(
            self.components, cond, structure, pipeline_type=pipeline_type,
            params=params or self.sampler_params("shape_slat"),
            normalization=self.files.normalizations["shape_slat_normalization"], generator=generator,
            max_tokens=max_tokens, progress=progress, should_stop=should_stop,
        )  # fmt: skip

    def material(self, cond: Conditioning, shape: ShapeLatent, *, generator: torch.Generator, params: SamplerParams | None = None,
                 progress: Progress | None = None, should_stop=None) -> MaterialLatent:  # fmt: skip
        return sample_material(
            self.components, cond, shape, params=params or self.sampler_params("tex_slat"),
            shape_normalization=self.files.normalizations["shape_slat_normalization"],
            tex_normalization=self.files.normalizations["tex_slat_normalization"],
            generator=generator, progress=progress, should_stop=should_stop,
        )  # fmt: skip

    def decode(self, shape: ShapeLatent, material: MaterialLatent | None = None) -> OVoxel:
        """Geometry O-Voxel, with PBR attributes when ``material`` is given."""
        geometry = decode_shape(self.components, shape)
        return geometry if material is None else decode_material(self.components, material, geometry)

    def _skip_structure_noise(self, g: torch.Generator) -> None:
        """Advance ``g`` past the SS noise draw, so a given structure leaves later stages on the reference's stream."""
        args = read_model_config(self.files.models["sparse_structure_flow_model"].config_path)["args"]
        r = args["resolution"]
        rng.randn((1, args["in_channels"], r, r, r), g, torch.device("cpu"))

    # ------------------------------------------------------------------------------------------- end to end
    def generate(
        self,
        image: Image.Image | Sequence[Image.Image],
        *,
        seed: int = 42,
        pipeline_type: str | None = None,
        structure: Structure | None = None,
        sampler_overrides: dict[str, dict[str, Any]] | None = None,
        max_tokens: int = MAX_TOKENS,
        preprocess: bool = True,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        multiview_mode: str = "concat",
    ) -> Generation:
        """Image (or a list of views of one object) to textured O-Voxel, reproducing the reference's ``run``.

        structure: use this sparse structure instead of sampling one (stage 1 is skipped; its noise is still
        drawn so later stages see the reference's random stream). progress(done, total) counts sampler steps
        over all stages. should_stop() is polled between steps; True raises ``Interrupted``.
        multiview_mode: how several views are combined (pipeline/multiview.py); one image ignores it.
        """
        pipeline_type = pipeline_type or self.default_pipeline_type
        p = plan(pipeline_type)
        overrides = sampler_overrides or {}
        unknown = sorted(set(overrides) - set(STAGES))
        if unknown:
            raise InputError(f"sampler_overrides has unknown stage(s) {unknown}; stages are {list(STAGES)}")
        params = {s: self.sampler_params(s, **overrides.get(s, {})) for s in STAGES}
        g = rng.generator(seed)  # a bad seed fails here, before DINOv3 runs
        cond = self.condition(image, p.cond_resolutions, preprocess=preprocess, multiview_mode=multiview_mode)

        steps = (params["sparse_structure"].steps, params["shape_slat"].steps * len(p.shape_models), params["tex_slat"].steps)
        total = sum(steps)

        def sub(offset: int) -> Progress | None:  # one stage's progress as part of the whole run
            return None if progress is None else (lambda done, _total: progress(offset + done, total))

        if structure is None:
            structure = self.structure(cond, pipeline_type=pipeline_type, generator=g, params=params["sparse_structure"],
                                       progress=sub(0), should_stop=should_stop)  # fmt: skip
        else:
            self._skip_structure_noise(g)
        shape = self.shape(cond, structure, pipeline_type=pipeline_type, generator=g, params=params["shape_slat"],
                           max_tokens=max_tokens, progress=sub(steps[0]), should_stop=should_stop)  # fmt: skip
        material = self.material(cond, shape, generator=g, params=params["tex_slat"], progress=sub(steps[0] + steps[1]),
                                 should_stop=should_stop)  # fmt: skip
        ovoxel = self.decode(shape, material)
        return Generation(ovoxel=ovoxel, structure=structure, shape=shape, material=material, conditioning=cond)

    def retexture(
        self,
        mesh: Mesh,
        image: Image.Image | Sequence[Image.Image],
        *,
        seed: int = 42,
        resolution: int = 1024,
        texture_size: int = 2048,
        keep_uvs: bool = True,
        sampler_overrides: dict[str, Any] | None = None,
        preprocess: bool = True,
        multiview_mode: str = "concat",
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Retexture:
        """PBR textures for the user's ``mesh`` (glTF Y-up, any scale) from an image or views (SPEC 16).

        Needs the texturing roles (``from_pretrained(..., config_file="texturing_pipeline.json")``).
        resolution: voxel grid R (1024 reference default, 512 faster). sampler_overrides: tex_slat sampler params.
        The returned mesh keeps the user's geometry (see pipeline/retexture.py). Same seed, same result.
        """
        check_resolution(resolution)
        missing = [r for r in ("shape_slat_encoder", "tex_slat_decoder") if not self.components.has(r)] \
            if hasattr(self.components, "has") else []  # fmt: skip
        if missing:
            raise InputError(
                f"retexture needs the texturing models {missing}, which pipeline.json does not list; load the "
                "pipeline with Trellis2Pipeline.from_pretrained(source, config_file='texturing_pipeline.json')"
            )
        _, cond_res = tex_role(resolution)
        params = self.sampler_params("tex_slat", **(sampler_overrides or {}))
        generator = rng.generator(seed)  # bad overrides or seed fail here, before DINOv3 runs
        cond = self.condition(image, (cond_res,), preprocess=preprocess, multiview_mode=multiview_mode)
        return retexture_mesh(
            self.components, cond, mesh, resolution=resolution, params=params,
            shape_normalization=self.files.normalizations["shape_slat_normalization"],
            tex_normalization=self.files.normalizations["tex_slat_normalization"],
            generator=generator, texture_size=texture_size, keep_uvs=keep_uvs,
            progress=progress, should_stop=should_stop,
        )  # fmt: skip


__all__ = ["Generation", "Trellis2Pipeline", "PIPELINE_TYPES", "default_device", "default_dtype", "tex_role"]
