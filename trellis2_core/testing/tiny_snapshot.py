"""A tiny random TRELLIS.2 snapshot in the official file layout, for tests and smoke runs (no downloads).

``write_tiny_snapshot(DIR)`` writes (about 4 MB, deterministic bytes for a given seed and library versions)::

    DIR/pipeline.json                  official schema, roles, sampler params and normalisations
    DIR/texturing_pipeline.json        the texturing pipeline's roles (SPEC 0), same values
    DIR/ckpts/<official name>.json     official class and argument names, TINY widths
    DIR/ckpts/<official name>.safetensors
    DIR/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.{json,safetensors}   (weights.py lookup order 2)
    DIR/dinov3/config.json + model.safetensors                                 (tiny transformers DINOv3ViT)

Tiny architecture (what the pipeline depends on is kept official):
* DiTs: 64 channels, 2 heads (head dim 32: RoPE 3 x 5 frequencies + 1 identity pair), 2 blocks; latent channels
  official (SS 8, shape 32 in/out, texture in 64 = 32 noise + 32 shape, out 32); cond_channels 64 = DINOv3 hidden.
* SC-VAEs: 5 levels with 4 C2S / S2C blocks, so the latent -> voxel factor stays 16 as in the official
  ``*_f16c32`` models (fewer levels would change the upsampling factor the cascade and decoding rely on);
  channels decoder 16-8-8-8-8, encoder 8-8-8-8-16, one ConvNeXt block per level (none at the fine end).
* SS decoder: channels 16-8-8, one res block per stage; two x2 upsamplings keep 16^3 -> 64^3.
* DINOv3: hidden 64, 2 layers, 4 heads, patch 16, 4 register tokens (the golden's tiny config).

Weights are seeded random (every tensor, including the ones the reference zero-initialises) and stored in the
dtypes the module holds for its config (bf16 DiT blocks, fp16 VAE blocks, fp32 elsewhere), like the released
files. A few biases are set so random runs stay small on a CPU: the SS decoder's output bias
(``SS_LOGIT_BIAS``) occupies ~0.1% of the 64^3 grid, and the shape decoder's ``to_subdiv`` biases
(``SUBDIV_LOGIT_BIAS``) keep few of the 8 children per level, except the last level, which keeps all 8
(``FINAL_SUBDIV_LOGIT_BIAS``) while the edge-flag bias (``EDGE_FLAG_LOGIT_BIAS``) flags most edges, so a smoke run
yields a real (blocky) surface that the mesh, bake and export stages can work on.

CLI: ``python -m trellis2.trellis2_core.testing.tiny_snapshot DIR [--seed N] [--no-dinov3] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..models import from_config
from ..weights import DINOV3_REPO, OFFICIAL_MODELS

# Measured with the tiny weights (seed 0, full pipeline runs): the bias-free SS logits have std ~0.5, so -1.2
# occupies ~0.1% of 64^3: 200-400 structure coords on the 32^3 grid. The bias-free to_subdiv logits have std 4-8
# and grow with the latent's magnitude; with -5 (and the last level keeping all 8 children, see below) the '512'
# and '1024_cascade' pipelines decode ~2-3k O-Voxels with the official 12 steps, ~30-45k with 2 steps.
# The last C2S level keeps all 8 children (logits of std <= 8 plus 40 are positive) and the edge-flag logits
# lean positive, so the decoded voxels form full 2x2x2 blocks whose inner quads exist: a real (blocky) surface.
SS_LOGIT_BIAS = -1.2
SUBDIV_LOGIT_BIAS = -5.0
FINAL_SUBDIV_LOGIT_BIAS = 40.0
EDGE_FLAG_LOGIT_BIAS = 2.0

_DIT = dict(
    model_channels=64, cond_channels=64, num_blocks=2, num_heads=2, mlp_ratio=5.3334, pe_mode="rope",
    share_mod=True, initialization="scaled", qk_rms_norm=True, qk_rms_norm_cross=True, dtype="bfloat16",
)  # fmt: skip
_SCVAE = dict(
    latent_channels=32,
    block_type=["SparseConvNeXtBlock3d"] * 5,
    block_args=[{"use_checkpoint": False}] * 5,
    use_fp16=True,
)
_DEC = dict(model_channels=[16, 8, 8, 8, 8], num_blocks=[1, 1, 1, 1, 0], up_block_type=["SparseResBlockC2S3d"] * 4)
_ENC = dict(model_channels=[8, 8, 8, 8, 16], num_blocks=[0, 1, 1, 1, 1], down_block_type=["SparseResBlockS2C3d"] * 4)

# Official checkpoint name -> tiny config (official class and argument names).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "ss_flow_img_dit_1_3B_64_bf16": {
        "name": "SparseStructureFlowModel", "args": dict(resolution=16, in_channels=8, out_channels=8, **_DIT)},
    "slat_flow_img2shape_dit_1_3B_512_bf16": {
        "name": "SLatFlowModel", "args": dict(resolution=32, in_channels=32, out_channels=32, **_DIT)},
    "slat_flow_img2shape_dit_1_3B_1024_bf16": {
        "name": "SLatFlowModel", "args": dict(resolution=64, in_channels=32, out_channels=32, **_DIT)},
    "slat_flow_imgshape2tex_dit_1_3B_512_bf16": {
        "name": "SLatFlowModel", "args": dict(resolution=32, in_channels=64, out_channels=32, **_DIT)},
    "slat_flow_imgshape2tex_dit_1_3B_1024_bf16": {
        "name": "SLatFlowModel", "args": dict(resolution=64, in_channels=64, out_channels=32, **_DIT)},
    "shape_dec_next_dc_f16c32_fp16": {
        "name": "FlexiDualGridVaeDecoder", "args": dict(resolution=256, **_DEC, **_SCVAE)},
    "tex_dec_next_dc_f16c32_fp16": {
        "name": "SparseUnetVaeDecoder", "args": dict(out_channels=6, pred_subdiv=False, **_DEC, **_SCVAE)},
    "shape_enc_next_dc_f16c32_fp16": {"name": "FlexiDualGridVaeEncoder", "args": dict(**_ENC, **_SCVAE)},
    "ss_dec_conv3d_16l8_fp16": {
        "name": "SparseStructureDecoder",
        "args": dict(out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[16, 8, 8],
                     use_fp16=True)},
}  # fmt: skip

TINY_DINOV3 = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
    num_register_tokens=4, image_size=224, rope_theta=100.0, layerscale_value=1.0,
)  # fmt: skip

_SAMPLER = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-05}}
# Official pipeline.json values (SPEC 0, manifests/pipeline.json).
_SHAPE_MEAN = [
    0.781296, 0.018091, -0.495192, -0.558457, 1.06053, 0.093252, 1.518149, -0.933218,
    -0.732996, 2.604095, -0.118341, -2.143904, 0.495076, -2.179512, -2.130751, -0.996944,
    0.261421, -2.217463, 1.260067, -0.150213, 3.790713, 1.481266, -1.046058, -1.523667,
    -0.059621, 2.22078, 1.621212, 0.87723, 0.567247, -3.175944, -3.186688, 1.578665,
]
_SHAPE_STD = [
    5.972266, 4.706852, 5.44501, 5.209927, 5.32022, 4.547237, 5.020802, 5.444004,
    5.226681, 5.683095, 4.831436, 5.286469, 5.652043, 5.367606, 5.525084, 4.730578,
    4.805265, 5.124013, 5.530808, 5.619001, 5.10393, 5.41767, 5.269677, 5.547194,
    5.634698, 5.235274, 6.110351, 5.511298, 6.237273, 4.879207, 5.347008, 5.405691,
]
_TEX_MEAN = [
    3.501659, 2.212398, 2.226094, 0.251093, -0.026248, -0.687364, 0.439898, -0.928075,
    0.029398, -0.339596, -0.869527, 1.038479, -0.972385, 0.126042, -1.129303, 0.455149,
    -1.209521, 2.069067, 0.544735, 2.569128, -0.323407, 2.293, -1.925608, -1.217717,
    1.213905, 0.971588, -0.023631, 0.10675, 2.021786, 0.250524, -0.662387, -0.768862,
]
_TEX_STD = [
    2.665652, 2.743913, 2.765121, 2.595319, 3.037293, 2.291316, 2.144656, 2.911822,
    2.969419, 2.501689, 2.154811, 3.163343, 2.621215, 2.381943, 3.186697, 3.021588,
    2.295916, 3.234985, 3.233086, 2.26014, 2.874801, 2.810596, 3.29272, 2.674999,
    2.680878, 2.372054, 2.451546, 2.353556, 2.995195, 2.379849, 2.786195, 2.77519,
]


def _guided(strength: float, rescale: float, interval: list[float], rescale_t: float) -> dict[str, Any]:
    params = dict(steps=12, guidance_strength=strength, guidance_rescale=rescale, guidance_interval=interval)
    return {**_SAMPLER, "params": {**params, "rescale_t": rescale_t}}


def official_pipeline_args(kind: str = "image_to_3d") -> dict[str, Any]:
    """The official pipeline.json (kind "image_to_3d") or texturing_pipeline.json ("texturing") content."""
    if kind not in ("image_to_3d", "texturing"):
        raise ValueError(f"kind must be 'image_to_3d' or 'texturing'; got {kind!r}")
    common = {
        "shape_slat_normalization": {"mean": _SHAPE_MEAN, "std": _SHAPE_STD},
        "tex_slat_normalization": {"mean": _TEX_MEAN, "std": _TEX_STD},
        "image_cond_model": {"name": "DinoV3FeatureExtractor", "args": {"model_name": DINOV3_REPO}},
        "rembg_model": {"name": "BiRefNet", "args": {"model_name": "briaai/RMBG-2.0"}},
    }
    tex_sampler = _guided(1.0, 0.0, [0.6, 0.9], 3.0)
    if kind == "texturing":
        roles = ("shape_slat_encoder", "tex_slat_decoder", "tex_slat_flow_model_512", "tex_slat_flow_model_1024")
        models = {r: OFFICIAL_MODELS.get(r, "ckpts/shape_enc_next_dc_f16c32_fp16") for r in roles}
        args = {"models": models, "tex_slat_sampler": tex_sampler, **common}
        return {"name": "Trellis2TexturingPipeline", "args": args}
    args = {
        "models": dict(OFFICIAL_MODELS),
        "sparse_structure_sampler": _guided(7.5, 0.7, [0.6, 1.0], 5.0),
        "shape_slat_sampler": _guided(7.5, 0.5, [0.6, 1.0], 3.0),
        "tex_slat_sampler": tex_sampler,
        **common,
        "default_pipeline_type": "1024_cascade",
    }
    return {"name": "Trellis2ImageTo3DPipeline", "args": args}


def random_state_dict(config: dict[str, Any], seed: int, name: str) -> dict[str, torch.Tensor]:
    """Seeded random weights for every tensor of the module ``config`` builds, in the module's dtypes.

    Matrices/convs ~ N(0, 1/fan_in); norm scales (1-D ``weight``, ``gamma``) ~ 1 + N(0, 0.1^2); everything else
    (biases, modulation) ~ N(0, 0.02^2). Keys are visited in sorted order from one generator per checkpoint.
    """
    expected = from_config(config, device="meta").state_dict()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = {}
    for key in sorted(expected):
        ref = expected[key]
        if not ref.dtype.is_floating_point:
            raise ValueError(f"{name}: cannot randomise non-float tensor {key} ({ref.dtype})")
        x = torch.randn(tuple(ref.shape), generator=gen, dtype=torch.float32)
        if key.endswith("gamma") or (ref.dim() == 1 and key.endswith("weight")):
            x = 1.0 + 0.1 * x
        elif ref.dim() >= 2:
            x = x / math.sqrt(max(1, ref[0].numel()))
        else:
            x = 0.02 * x
        out[key] = x
    _calibrate(config, out)
    return {k: v.to(expected[k].dtype).contiguous() for k, v in out.items()}


def _calibrate(config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Set the biases that decide how many voxels random weights produce (see the module docstring)."""
    if config["name"] == "SparseStructureDecoder":
        state["out_layer.2.bias"].fill_(SS_LOGIT_BIAS)
    subdiv = sorted(k for k in state if k.endswith("to_subdiv.bias"))
    for key in subdiv:
        state[key].fill_(SUBDIV_LOGIT_BIAS)
    if config["name"] == "FlexiDualGridVaeDecoder" and subdiv:
        # Smoke runs must yield a real surface: the last level keeps all 8 children, so every parent becomes a
        # full 2x2x2 block, and the edge-flag logits lean positive, so the quads inside each block exist.
        state[subdiv[-1]].fill_(FINAL_SUBDIV_LOGIT_BIAS)
        state["output_layer.bias"][3:6] = EDGE_FLAG_LOGIT_BIAS


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def _write_dinov3(folder: Path, seed: int) -> None:
    """A tiny transformers DINOv3ViTModel folder (config.json + model.safetensors) with seeded weights."""
    import transformers
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(**TINY_DINOV3)
    with torch.random.fork_rng(devices=[]):  # the constructor's own init must not disturb the caller's RNG
        model = DINOv3ViTModel(config)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"dinov3"))
    with torch.no_grad():
        for key, t in sorted(model.state_dict().items()):
            x = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float32)
            if t.dim() == 1 and key.endswith(("weight", "lambda1")):  # norm and LayerScale scales
                x = 1.0 + 0.1 * x
            elif t.dim() >= 2:
                x = x / math.sqrt(max(1, t[0].numel()))
            else:
                x = 0.02 * x
            t.copy_(x)
    # save_pretrained writes the official key names (transformers renames its in-memory keys on save).
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def write_tiny_snapshot(
    directory: str | os.PathLike, *, seed: int = 0, dinov3: bool = True, overwrite: bool = False
) -> Path:
    """Write the tiny snapshot into ``directory`` (created if needed); returns its path.

    Refuses a non-empty directory unless ``overwrite`` (then files of the snapshot are replaced, others kept).
    dinov3=False skips the DINOv3 folder (no transformers import; the pipeline then needs the real one).
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise InputError(f"directory: {root} exists and is not a folder; pass a new or empty folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise InputError(
            f"directory: {root} is not empty; pass an empty folder, or overwrite=True (--force) to replace"
        )
    root.mkdir(parents=True, exist_ok=True)
    for kind, file in (("image_to_3d", "pipeline.json"), ("texturing", "texturing_pipeline.json")):
        _write_json(root / file, official_pipeline_args(kind))
    paths = {path.split("/")[-1]: path for path in OFFICIAL_MODELS.values()}
    paths.setdefault("shape_enc_next_dc_f16c32_fp16", "ckpts/shape_enc_next_dc_f16c32_fp16")
    for name, config in TINY_CONFIGS.items():
        parts = paths[name].split("/")
        # Another repo's checkpoint goes to DIR/<repo>/ckpts (lookup order 2 in weights.py).
        folder = root.joinpath(*parts[1:-1]) if len(parts) >= 3 else root.joinpath(*parts[:-1])
        _write_json(folder / f"{name}.json", config)
        save_file(random_state_dict(config, seed, name), str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
    if dinov3:
        _write_dinov3(root / "dinov3", seed)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trellis2.trellis2_core.testing.tiny_snapshot",
        description="Write a tiny random TRELLIS.2 snapshot in the official file layout (for tests and smoke runs).",
    )
    parser.add_argument("directory", help="folder to create (must be empty unless --force)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--no-dinov3", action="store_true", help="skip the tiny DINOv3 folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing snapshot files")
    ns = parser.parse_args(argv)
    try:
        root = write_tiny_snapshot(ns.directory, seed=ns.seed, dinov3=not ns.no_dinov3, overwrite=ns.force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote tiny TRELLIS.2 snapshot to {root} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
