"""DINOv3 image tokens that condition every TRELLIS.2 flow model (SPEC.md section 13).

``DinoV3Conditioner.encode(image, 512)`` -> ``[1, 1029, 1024]`` float32 tokens (CLS, 4 registers, 32x32 patches
row-major); 1024 -> ``[1, 4101, 1024]``. The network is transformers' ``DINOv3ViTModel`` (ViT-L/16 weights
``facebook/dinov3-vitl16-pretrain-lvd1689m``, a gated repo). TRELLIS.2 does not use the model's final affine
norm: it takes the tokens after the last transformer layer and applies a non-affine LayerNorm (eps 1e-5).

transformers is imported lazily (only when a model is built), so importing the engine stays cheap.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

DINOV3_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POST_NORM_EPS = 1e-5
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]


class DinoV3Conditioner:
    """Wraps an eval-mode ``DINOv3ViTModel``; build with ``from_folder`` / ``from_hub`` or pass a model.

    The model runs in its own dtype (the reference: float32) on its own device; tokens come back float32.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.patch_size = _patch_size(model.config)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_folder(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "DinoV3Conditioner":
        """Load a DINOv3 ViT saved in Hugging Face layout (``config.json`` + ``model.safetensors``), offline.

        Every checkpoint tensor must match the model (missing, unexpected or mis-shaped keys raise
        CheckpointError); transformers' own renames (e.g. the 4.x ``layer.N`` -> 5.x ``model.layer.N``) apply.
        """
        folder = Path(path)
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise CheckpointError(
                f"DINOv3 folder {str(folder)!r}: expected config.json and model.safetensors (Hugging Face layout); "
                f"found {sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else 'no such folder'}. "
                f"Download {DINOV3_REPO} (config.json, model.safetensors) into it."
            )
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "dinov3_vit":
            raise CheckpointError(
                f"DINOv3 folder {str(folder)!r}: config.json has model_type {model_type!r}; expected 'dinov3_vit' "
                f"(a DINOv3 ViT such as {DINOV3_REPO})."
            )
        DINOv3ViTModel = _transformers_class()
        logger.info("loading DINOv3 from %s (%s, %s)", folder, device, dtype)
        model, info = DINOv3ViTModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            detail = "; ".join(f"{k} ({len(v)}): {v[:20]}" for k, v in problems.items())
            raise CheckpointError(f"DINOv3 folder {str(folder)!r}: weights do not match the model: {detail}")
        return cls(model.to(device=device, dtype=dtype))

    @classmethod
    def from_hub(
        cls,
        repo_id: str = DINOV3_REPO,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
    ) -> "DinoV3Conditioner":
        """Download (or reuse the cached) ``repo_id`` through huggingface_hub, then ``from_folder``."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError

        try:
            folder = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=_WEIGHT_PATTERNS
            )
        except GatedRepoError as e:
            raise CheckpointError(
                f"DINOv3 {repo_id!r} is a gated repository: accept its licence at https://huggingface.co/{repo_id} "
                "with your account, then log in (`hf auth login`) or set HF_TOKEN; or download config.json and "
                "model.safetensors yourself and load the folder with DinoV3Conditioner.from_folder."
            ) from e
        except OSError as e:  # network, offline mode, unknown repo/revision: all OSError subclasses
            raise CheckpointError(
                f"DINOv3 {repo_id!r}: download failed ({type(e).__name__}: {e}). Check the network / HF_HUB_OFFLINE, "
                "or put config.json and model.safetensors in a folder and use DinoV3Conditioner.from_folder."
            ) from e
        return cls.from_folder(folder, device, dtype)

    # --------------------------------------------------------------------------------------------- features

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.weight.dtype

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        """Move the model (e.g. offload to CPU between stages); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def pixels(self, image: Image.Image, resolution: int) -> torch.Tensor:
        """Network input: PIL resize to ``resolution^2`` (LANCZOS), /255, ImageNet-normalised.

        Returns float32 ``[1, 3, resolution, resolution]`` on the CPU.
        """
        if not isinstance(image, Image.Image):
            raise InputError(
                f"image: expected a PIL image (the output of preprocess_image); got {type(image).__name__}"
            )
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % self.patch_size:
            raise InputError(
                f"resolution: expected a positive multiple of the patch size {self.patch_size} (TRELLIS.2 uses 512 "
                f"and 1024); got {resolution!r}"
            )
        img = image.resize((resolution, resolution), Image.Resampling.LANCZOS).convert("RGB")
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, 1 + R + (S/p)^2, hidden]`` float32 tokens (R registers).

        The tokens after the last transformer layer, taken as the input of the model's final ``norm`` (a hook:
        robust to transformers moving the layers from ``model.layer`` (4.x) to ``model.model.layer`` (5.x)),
        then LayerNorm without affine, eps 1e-5, over every token.
        """
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise InputError(f"pixels: expected [B, 3, S, S] normalised RGB; got shape {tuple(pixels.shape)}")
        captured: list[torch.Tensor] = []
        handle = self.model.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            self.model(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        finally:
            handle.remove()
        h = captured[0].float()
        return F.layer_norm(h, h.shape[-1:], eps=POST_NORM_EPS)

    def encode(self, image: Image.Image, resolution: int) -> torch.Tensor:
        """Conditioning tokens of one preprocessed image: ``[1, 5 + (resolution/16)^2, hidden]`` float32 on the
        model's device (ViT-L/16: 1029 x 1024 at 512, 4101 x 1024 at 1024)."""
        return self.features(self.pixels(image, resolution))

    @staticmethod
    def negative(cond: torch.Tensor) -> torch.Tensor:
        """The unconditional context: all-zero tokens of the same shape (not an empty context; SPEC 17.12)."""
        return torch.zeros_like(cond)


def _transformers_class() -> Any:
    try:
        from transformers import DINOv3ViTModel
    except ImportError as e:
        raise ImportError(
            "DINOv3 conditioning needs transformers >= 4.56 (DINOv3ViTModel): pip install -U 'transformers>=4.56'"
        ) from e
    return DINOv3ViTModel


def _patch_size(config: Any) -> int:
    p = getattr(config, "patch_size", 16)
    return int(p[0] if isinstance(p, (tuple, list)) else p)


__all__ = ["DINOV3_REPO", "DinoV3Conditioner", "IMAGENET_MEAN", "IMAGENET_STD"]
