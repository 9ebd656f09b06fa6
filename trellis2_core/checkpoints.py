"""Verify safetensors checkpoints and load them strictly into modules built on the meta device.

Loading order (each step fails with a ``CheckpointError`` that names the file and the fix, before any
tensor data is read):
1. read the official ``ckpts/<name>.json`` (``{"name", "args"}``) and build the module on "meta" (no memory);
2. read and validate the safetensors header: the file exists, the 8-byte length and the JSON header fit in
   the file, every tensor's byte range lies inside the file and matches its dtype and shape. A truncated or
   partially downloaded file is caught here;
3. compare keys and shapes with the meta module: missing, unexpected and mis-shaped keys are listed (up to
   20 each); when most keys disagree the message guesses which model the file really belongs to;
4. read the tensors one at a time (``safe_open``, never pickle), cast each to the dtype the module chose for
   that parameter, move it to ``device`` and ``load_state_dict(strict=True, assign=True)``.

The SS flow file may carry the reference's persistent ``rope_phases`` buffer; we recompute it, so that one
key is dropped silently for ``SparseStructureFlowModel``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, ConfigError
from .models import parse_config
from .nn.fp8 import quantize_blocks

log = logging.getLogger(__name__)

# safetensors itself refuses headers above 100 MB; a bigger length prefix means the file is not safetensors.
_MAX_HEADER = 100_000_000
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Keys a file may carry that we recompute instead of loading (SPEC 4: reference persistent buffer).
_DROPPED_KEYS = {"SparseStructureFlowModel": frozenset({"rope_phases"})}
_MAX_LISTED = 20
_REDOWNLOAD = "delete it and download again (or copy it again from a complete source)"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header: dtype string ('F32', 'BF16', ...), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Validated header of a safetensors file: key -> TensorInfo. Reads only the header, never tensor data.

    Raises CheckpointError (naming the file and "delete it and download again") when the file is missing,
    shorter than its header, has a header that is not JSON, or has a tensor whose bytes lie outside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; download it or place it there")
    size = path.stat().st_size

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {path} is truncated or corrupt ({why}); {_REDOWNLOAD}")

    if size < 8:
        raise corrupt(f"only {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise corrupt(f"header length {n} is not plausible: not a safetensors file")
        if 8 + n > size:
            raise corrupt(f"header needs {8 + n} bytes, file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"malformed header entry for {key!r}: {entry!r:.200}") from e
        if dtype not in _ITEMSIZE:
            raise corrupt(f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise corrupt(f"tensor {key!r} has invalid data offsets {[begin, end]}")
        if end > data_size:
            raise corrupt(f"tensor {key!r} ends at byte {end} of the data section, which has only {data_size} bytes")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * _ITEMSIZE[dtype]:
            raise corrupt(f"tensor {key!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        out[key] = TensorInfo(dtype, shape, begin, end)
    return out


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The official ``ckpts/<name>.json`` content as a dict (``{"name", "args"}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model config {path} does not exist; download it or place it there")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"model config {path} is not valid JSON ({e}); {_REDOWNLOAD}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"model config {path} must hold a JSON object with 'name' and 'args'; {_REDOWNLOAD}")
    return config


# What a file holds, judged from its keys and shapes alone (for "is this the checkpoint of another model?").
def guess_checkpoint_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A human description of the model a state dict (key -> shape) belongs to, e.g. 'a shape SC-VAE decoder'."""

    def dim(key: str, axis: int) -> int | None:
        s = shapes.get(key)
        return s[axis] if s is not None and len(s) > axis else None

    if "t_embedder.mlp.0.weight" in shapes or "rope_phases" in shapes:
        cin = dim("input_layer.weight", 1)
        if "rope_phases" in shapes or cin == 8:
            return "a sparse-structure flow model (SparseStructureFlowModel, ss_flow_img_dit_*)"
        if cin is not None and cin > 32:
            return "a texture latent flow model (SLatFlowModel, slat_flow_imgshape2tex_dit_*)"
        return "a shape latent flow model (SLatFlowModel, slat_flow_img2shape_dit_*)"
    if "from_latent.weight" in shapes:
        if any(k.endswith("to_subdiv.weight") for k in shapes):
            return "a shape SC-VAE decoder (FlexiDualGridVaeDecoder, shape_dec_*)"
        return "a texture SC-VAE decoder (SparseUnetVaeDecoder, tex_dec_*)"
    if "to_latent.weight" in shapes:
        return "an SC-VAE encoder (FlexiDualGridVaeEncoder / SparseUnetVaeEncoder, shape_enc_* / tex_enc_*)"
    if any(k.startswith("middle_block.") for k in shapes):
        if dim("out_layer.2.weight", 0) == 1:
            return "a sparse-structure decoder (SparseStructureDecoder, ss_dec_conv3d_*)"
        return "a sparse-structure encoder (SparseStructureEncoder, ss_enc_conv3d_*)"
    if any("cls_token" in k or k.startswith(("layer.", "model.layer.")) for k in shapes):
        return "a DINOv3 ViT image encoder (transformers)"
    return "an unknown model"


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more


def check_keys(
    expected: Mapping[str, torch.Tensor],
    header: Mapping[str, TensorInfo],
    *,
    weights_path: Path,
    config_source: str,
    model_name: str,
) -> None:
    """Raise CheckpointError unless the file has exactly the expected keys with the expected shapes and kinds.

    Keys the reference saves but we recompute (``rope_phases`` of the SS flow) are ignored when the model lacks them.
    """
    dropped = {k for k in _DROPPED_KEYS.get(model_name, ()) if k not in expected}
    header = {k: v for k, v in header.items() if k not in dropped}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    misshaped, wrong_kind = [], []
    for k in sorted(set(expected) & set(header)):
        want, have = tuple(expected[k].shape), header[k]
        if want != have.shape:
            misshaped.append(f"{k} (file {list(have.shape)}, model {list(want)})")
        elif expected[k].dtype.is_floating_point != (have.dtype in _FLOAT):
            wrong_kind.append(f"{k} (file {have.dtype}, model {str(expected[k].dtype).removeprefix('torch.')})")
    if not (missing or unexpected or misshaped or wrong_kind):
        return
    msg = f"checkpoint {weights_path} does not match {config_source} ({model_name})."
    file_kind = guess_checkpoint_kind({k: v.shape for k, v in header.items()})
    model_kind = guess_checkpoint_kind({k: tuple(v.shape) for k, v in expected.items()})
    matched = len(expected) - len(missing) - len(misshaped) - len(wrong_kind)
    if file_kind != model_kind:
        msg += (
            f"\n  This file looks like the checkpoint of {file_kind}, but the config describes {model_kind}: "
            f"were files swapped or renamed? {matched} of the model's {len(expected)} tensors match."
        )
    elif matched < len(expected) / 2:
        msg += (
            f"\n  Both describe {model_kind}, but only {matched} of the model's {len(expected)} tensors match: "
            "the config's widths/depths differ from the file's (edited config, or a checkpoint of another size)."
        )
    if missing:
        msg += _listing("missing keys", missing)
    if unexpected:
        msg += _listing("unexpected keys", unexpected)
    if misshaped:
        msg += _listing("mis-shaped keys", misshaped)
    if wrong_kind:
        msg += _listing("keys of the wrong kind (float vs integer)", wrong_kind)
    msg += (
        f"\nFix: use the official config and weights of the same checkpoint (restore {config_source} if it was "
        f"edited; otherwise {weights_path.name} is the wrong file: {_REDOWNLOAD})."
    )
    raise CheckpointError(msg)


ModelSource = Union[str, os.PathLike, tuple, Any]


def _split_source(source: ModelSource) -> tuple[dict[str, Any], str, Path]:
    """(config dict, config description for messages, safetensors path) from any accepted source form."""
    if hasattr(source, "config_path") and hasattr(source, "weights_path"):  # weights.ModelFiles
        return read_model_config(source.config_path), str(source.config_path), Path(source.weights_path)
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[0], Mapping):
            raise TypeError(f"source: expected (config dict, safetensors path); got {source!r:.200}")
        return dict(source[0]), "the given config", Path(source[1])
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        config_path = stem.with_name(stem.name + ".json")
        return read_model_config(config_path), str(config_path), stem.with_name(stem.name + ".safetensors")
    raise TypeError(
        "source: expected a ckpts/<name>.json path, a (config dict, safetensors path) pair or a ModelFiles; "
        f"got {type(source).__name__}"
    )


def load_model(
    source: ModelSource,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ops: Any = None,
    fp8: bool = False,
) -> torch.nn.Module:
    """Build the model a checkpoint's config describes and load its weights strictly.

    source: ``ckpts/<name>.json`` (or the path without suffix; the weights are ``<name>.safetensors`` beside
            it), a ``(config dict, safetensors path)`` pair, or a ``weights.ModelFiles``.
    device: where the weights go. dtype: precision of the heavy blocks (None = the config's: bf16 DiTs,
            fp16 VAEs; pass torch.float32 for CPU). Parameters the model keeps in fp32 stay fp32; every file
            tensor is cast to its parameter's dtype, so files of any float precision load.
    ops:    Linear/Conv3d/LayerNorm namespace (ComfyUI casting ops); None = torch.nn.
    fp8:    store a DiT's transformer-block Linear weights as float8 e4m3 after loading (``nn/fp8.py``: half the
            memory, FP8 GEMMs on GPUs that have them); other models are unaffected.
    Returns the module in eval mode with ``requires_grad`` off.
    """
    config, config_source, weights_path = _split_source(source)
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device: weights cannot be loaded onto 'meta'; pass 'cpu', 'cuda', 'mps', ...")
    start = time.perf_counter()
    try:
        cls, cfg = parse_config(config, source=config_source)
    except ConfigError as e:
        if config_source in str(e):
            raise
        raise ConfigError(f"{config_source}: {e}") from e
    model_name = config["name"]
    module = cls(cfg, device="meta", dtype=dtype, ops=ops)
    expected = module.state_dict()

    header = read_safetensors_header(weights_path)
    check_keys(expected, header, weights_path=weights_path, config_source=config_source, model_name=model_name)

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key, ref in expected.items():
                state[key] = f.get_tensor(key).to(device=device, dtype=ref.dtype)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint file {weights_path} cannot be read ({e}); {_REDOWNLOAD}") from e
    module.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        # A model class bug, not a user error: buffers must be computed lazily or be part of the state dict.
        raise RuntimeError(
            f"{cls.__name__}: tensors {still_meta[:_MAX_LISTED]} are still on 'meta' after loading {weights_path}; "
            "non-persistent buffers must be created lazily on the input's device"
        )
    module.eval().requires_grad_(False)
    if fp8 and quantize_blocks(module):
        model_name += " (fp8 blocks)"
    log.info("loaded %s (%s) from %s in %.2fs", model_name, config_source, weights_path, time.perf_counter() - start)
    return module


__all__ = [
    "TensorInfo",
    "check_keys",
    "guess_checkpoint_kind",
    "load_model",
    "read_model_config",
    "read_safetensors_header",
]
