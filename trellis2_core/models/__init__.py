"""Every official TRELLIS.2 network, one file per official class, with the official parameter names.

``from_config({"name": ..., "args": {...}})`` builds the module the official JSON describes. By default it is
built on the meta device (no memory) so that a checkpoint can be loaded into it with ``assign=True``
(see ``trellis2_core.checkpoints.load_model``). Model classes are imported lazily: building one model never imports the others.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch

from ..errors import ConfigError
from .config import ModelConfig

# Official JSON "name" -> (module file, class). The training class ElasticSLatFlowModel has the same keys.
REGISTRY: dict[str, tuple[str, str]] = {
    "SparseStructureFlowModel": ("sparse_structure_flow", "SparseStructureFlowModel"),
    "SparseStructureEncoder": ("sparse_structure_vae", "SparseStructureEncoder"),
    "SparseStructureDecoder": ("sparse_structure_vae", "SparseStructureDecoder"),
    "SLatFlowModel": ("structured_latent_flow", "SLatFlowModel"),
    "ElasticSLatFlowModel": ("structured_latent_flow", "SLatFlowModel"),
    "SparseUnetVaeEncoder": ("sparse_unet_vae", "SparseUnetVaeEncoder"),
    "SparseUnetVaeDecoder": ("sparse_unet_vae", "SparseUnetVaeDecoder"),
    "FlexiDualGridVaeEncoder": ("fdg_vae", "FlexiDualGridVaeEncoder"),
    "FlexiDualGridVaeDecoder": ("fdg_vae", "FlexiDualGridVaeDecoder"),
}


def model_class(name: str) -> type[torch.nn.Module]:
    """The module class registered for an official model name."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model name {name!r}; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def parse_config(config: Mapping[str, Any], *, source: str = "config") -> tuple[type[torch.nn.Module], ModelConfig]:
    """Validate an official ``{"name", "args"}`` dict; returns (module class, frozen config)."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ConfigError(f"{source}: expected a JSON object with 'name' and 'args'; got {config!r:.200}")
    extra = sorted(set(config) - {"name", "args"})
    if extra:
        raise ConfigError(f"{source}: unexpected top-level key(s) {extra}; an official model config has only 'name' and 'args'")
    cls = model_class(config["name"])
    return cls, cls.Config.from_args(config.get("args", {}), source=f"{source} ({config['name']})")


def from_config(
    config: Mapping[str, Any],
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
    ops: Any = None,
) -> torch.nn.Module:
    """Build the module an official ``{"name", "args"}`` config describes.

    device: where parameters are created; "meta" (default) allocates nothing, for loading with assign.
    dtype:  precision of the heavy blocks; None keeps the config's (bf16 DiTs, fp16 VAEs as released).
            Pass torch.float32 on CPU/MPS. Parameters the reference keeps in fp32 stay fp32.
    ops:    namespace with Linear / Conv3d / LayerNorm classes (ComfyUI's casting ops); None = torch.nn.
    """
    cls, cfg = parse_config(config)
    return cls(cfg, device=device, dtype=dtype, ops=ops)


__all__ = ["REGISTRY", "ModelConfig", "from_config", "model_class", "parse_config"]
