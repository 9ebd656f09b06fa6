"""What each model's weights cost on the device, read from checkpoint headers or manifests (no tensor data), and
the shapes the memory planner's activation formulas need (``pipeline/memory.py``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from ..checkpoints import read_model_config, read_safetensors_header

IMAGE_COND = "image_cond_model"  # same as trellis2.IMAGE_COND (not imported: trellis2.py imports the planner)
_DIT = {"SparseStructureFlowModel", "SLatFlowModel", "ElasticSLatFlowModel"}
_SC_DEC = {"FlexiDualGridVaeDecoder", "SparseUnetVaeDecoder"}
_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
         "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
# DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m): 303 M parameters, loaded in float32. For planning
# from manifests, which do not list it; ``sizes_from_files`` reads the real header.
DINOV3_VITL16_BYTES = 303_129_600 * 4


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Weights of one role: total bytes, bytes per DiT block, and the shapes the activation formulas need."""

    role: str
    kind: str  # "dit", "sc_decoder", "ss_decoder", "image_cond", "other"
    weight_bytes: int
    block_bytes: tuple[int, ...] = ()  # per entry of ``blocks`` (DiTs)
    channels: tuple[int, ...] = ()  # dit: (C, H); sc_decoder: model_channels per level
    elem_bytes: int = 2
    resolution: int = 0  # dit: config resolution (the dense SS flow has resolution^3 tokens)
    level_blocks: tuple[int, ...] = ()  # sc_decoder: ConvNeXt blocks per level (empty: every level has some)

    def streamed_bytes(self, prefetch: int) -> int:
        """Weights on the device while streaming: everything but the blocks, plus (1 + prefetch) largest blocks."""
        if not self.block_bytes:
            return self.weight_bytes
        window = sum(sorted(self.block_bytes, reverse=True)[: 1 + prefetch])
        return self.weight_bytes - sum(self.block_bytes) + window

    @classmethod
    def from_tensors(cls, role: str, class_name: str, args: Mapping[str, Any], tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                     dtype: torch.dtype | None = None, fp8: bool = False) -> ModelSize:  # fmt: skip
        """tensors: key -> (safetensors dtype string, shape). dtype: block precision the loader casts half tensors to.
        fp8: a DiT's block Linear weights are stored e4m3 (1 byte per value + a float32 scale per output channel,
        ``nn/fp8.py``)."""
        kinds = {**dict.fromkeys(_DIT, "dit"), **dict.fromkeys(_SC_DEC, "sc_decoder"), "SparseStructureDecoder": "ss_decoder"}
        kind = "image_cond" if role == IMAGE_COND else kinds.get(class_name, "other")
        half = dtype.itemsize if dtype is not None else None
        total, blocks, elem = 0, {}, 2
        for key, (dt, shape) in tensors.items():
            if key == "rope_phases":
                continue  # recomputed, never loaded (checkpoints.py)
            numel = 1
            for s in shape:
                numel *= s
            size = half if (half is not None and dt in ("F16", "BF16")) else _ITEM.get(dt, 4)
            nbytes = numel * size
            if key.startswith("blocks."):
                idx = int(key.split(".")[1]) if key.split(".")[1].isdigit() else 0
                if len(shape) >= 2:
                    elem = size
                if fp8 and kind == "dit" and len(shape) == 2 and key.endswith(".weight"):
                    nbytes = numel + 4 * shape[0]
                blocks[idx] = blocks.get(idx, 0) + nbytes
            total += nbytes
        channels: tuple[int, ...] = ()
        if kind == "dit":
            c = int(args["model_channels"])
            channels = (c, int(c * float(args.get("mlp_ratio", 4.0))))
        elif kind == "sc_decoder":
            channels = tuple(int(c) for c in args["model_channels"])
        block_bytes = tuple(blocks[i] for i in sorted(blocks)) if kind == "dit" else ()
        level_blocks = tuple(int(b) for b in args.get("num_blocks", ())) if kind == "sc_decoder" else ()
        return cls(role, kind, total, block_bytes, channels, elem, int(args.get("resolution", 0) or 0), level_blocks)


def sizes_from_files(files: Any, dtype: torch.dtype | None = None, fp8: bool = False) -> dict[str, ModelSize]:
    """ModelSize per role of a ``weights.PipelineFiles`` (headers only: no tensor data is read); fp8: see
    ``ModelSize.from_tensors``."""
    out = {}
    for role, mf in files.models.items():
        cfg = read_model_config(mf.config_path)
        header = read_safetensors_header(mf.weights_path)
        tensors = {k: (v.dtype, v.shape) for k, v in header.items()}
        out[role] = ModelSize.from_tensors(role, cfg.get("name", ""), cfg.get("args", {}), tensors, dtype, fp8)
    dino = getattr(files, "dinov3_path", None)
    if dino is not None:
        tensors = {}
        for f in sorted(os.listdir(dino)):
            if f.endswith(".safetensors"):
                tensors.update({k: (v.dtype, v.shape) for k, v in read_safetensors_header(os.path.join(dino, f)).items()})
        out[IMAGE_COND] = ModelSize.from_tensors(IMAGE_COND, "DINOv3", {}, tensors, torch.float32)
    return out


def sizes_from_manifests(manifests: Mapping[str, Mapping[str, Any]], dtype: torch.dtype | None = None,
                         fp8: bool = False) -> dict[str, ModelSize]:  # fmt: skip
    """ModelSize per role from manifest dicts ({"config": {"name", "args"}, "params": {key: {"shape", "dtype"}}})."""
    return {
        role: ModelSize.from_tensors(role, m["config"]["name"], m["config"]["args"],
                                     {k: (v["dtype"], tuple(v["shape"])) for k, v in m["params"].items()}, dtype, fp8)
        for role, m in manifests.items()
    }  # fmt: skip


__all__ = ["DINOV3_VITL16_BYTES", "IMAGE_COND", "ModelSize", "sizes_from_files", "sizes_from_manifests"]
