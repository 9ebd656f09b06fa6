"""Dense sparse-structure VAE (SPEC 6): golden decoder logits, occupancy coords, encoder shapes and precision layout."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_rel
from trellis2.trellis2_core.errors import ConfigError, InputError
from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.models.sparse_structure_vae import (
    SparseStructureDecoder,
    SparseStructureEncoder,
    pixel_shuffle_3d,
)
from trellis2.trellis2_core.structure import occupancy_coords

TINY_ENC = {"name": "SparseStructureEncoder", "args": {"in_channels": 1, "latent_channels": 8, "num_res_blocks": 1,
                                                       "num_res_blocks_middle": 1, "channels": [8, 16, 24]}}


def _golden_decoder(golden):
    g = golden("ss_decoder_forward")
    model = from_config({"name": g.config["name"], "args": g.config["args"]}, device="cpu")
    model.load_state_dict(g.weights, strict=True)
    return g, model.eval()


def test_decoder_golden_logits(golden):
    g, model = _golden_decoder(golden)
    with torch.no_grad():
        logits = model(g.inputs["z"])
    assert logits.dtype == torch.float32
    assert_close_rel(logits, g.outputs["logits"], what="logits")


def test_occupancy_coords_golden(golden):
    g, model = _golden_decoder(golden)
    with torch.no_grad():
        logits = model(g.inputs["z"])
    coords = occupancy_coords(logits, 16)
    assert coords.dtype == torch.int32
    assert torch.equal(coords, g.outputs["coords"])
    # the golden logits themselves must give the same sets (no dependence on our forward)
    assert torch.equal(occupancy_coords(g.outputs["logits"], 8), g.outputs["coords_pooled2"])
    assert torch.equal(occupancy_coords(logits, 8), g.outputs["coords_pooled2"])


def test_occupancy_pooling_is_or_and_order_is_lexicographic():
    logits = torch.full((2, 1, 4, 4, 4), -1.0)
    logits[0, 0, 3, 0, 1] = 1.0  # -> pooled (0, 1, 0, 0)
    logits[1, 0, 0, 0, 0] = 0.0  # exactly 0 is empty (> 0, not >= 0)
    logits[1, 0, 2, 3, 3] = 5.0
    logits[1, 0, 0, 1, 2] = 5.0
    full = occupancy_coords(logits, 4)
    assert full.tolist() == [[0, 3, 0, 1], [1, 0, 1, 2], [1, 2, 3, 3]]
    assert occupancy_coords(logits, 2).tolist() == [[0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]]
    assert occupancy_coords(logits, 1).tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("bad", [3, 0, 8, 2.0, True])
def test_occupancy_bad_resolution(bad):
    with pytest.raises(InputError, match="resolution"):
        occupancy_coords(torch.zeros(1, 1, 4, 4, 4), bad)


def test_occupancy_bad_logits_shape():
    with pytest.raises(InputError, match=r"\[B, 1, D, D, D\]"):
        occupancy_coords(torch.zeros(1, 2, 4, 4, 4), 4)
    with pytest.raises(InputError, match="cubic"):
        occupancy_coords(torch.zeros(1, 1, 4, 4, 2), 2)


def test_pixel_shuffle_matches_spec_formula():
    x = torch.arange(1 * 16 * 2 * 3 * 2, dtype=torch.float32).reshape(1, 16, 2, 3, 2)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 4, 6, 4)
    for c in range(2):
        for a in range(2):
            for b in range(2):
                for g in range(2):
                    assert torch.equal(y[0, c, a::2, b::2, g::2], x[0, c * 8 + a * 4 + b * 2 + g])


def _random_init(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def test_encoder_shape_determinism_and_roundtrip_smoke():
    enc = _random_init(from_config(TINY_ENC, device="cpu"))
    x = (torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    with torch.no_grad():
        z1, z2 = enc(x), enc(x)
        mean, logvar = enc.posterior(x)
    assert z1.shape == (2, 8, 4, 4, 4) and z1.dtype == torch.float32
    assert torch.equal(z1, z2) and torch.equal(z1, mean) and logvar.shape == mean.shape
    # batch items are independent
    with torch.no_grad():
        assert_close_rel(enc(x[1:]), z1[1:], rtol=1e-6, what="batch item")
    dec_cfg = {"name": "SparseStructureDecoder", "args": {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 1,
                                                          "num_res_blocks_middle": 1, "channels": [24, 16, 8]}}
    dec = _random_init(from_config(dec_cfg, device="cpu"), seed=2)
    with torch.no_grad():
        logits = dec(z1)
    assert logits.shape == (2, 1, 16, 16, 16) and torch.isfinite(logits).all()


def test_fp16_layout_and_explicit_dtype():
    args = dict(TINY_ENC["args"], use_fp16=True)
    enc = SparseStructureEncoder(SparseStructureEncoder.Config.from_args(args), device="meta")
    sd = enc.state_dict()
    assert sd["blocks.0.conv1.weight"].dtype == torch.float16
    assert sd["middle_block.0.conv2.bias"].dtype == torch.float16
    assert sd["blocks.1.conv.weight"].shape == (16, 8, 2, 2, 2)
    for k in ("blocks.0.norm1.weight", "input_layer.weight", "out_layer.0.bias", "out_layer.2.weight"):
        assert sd[k].dtype == torch.float32, k
    # an explicit dtype overrides use_fp16 for the blocks only (CPU path)
    enc32 = SparseStructureEncoder(SparseStructureEncoder.Config.from_args(args), device="meta", dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in enc32.state_dict().values())


def test_reduced_precision_forward_tracks_fp32(golden):
    """Blocks in bf16 (fp16 convs are not implemented on every CPU build): fp32 in/out, close to fp32 result."""
    g, ref = _golden_decoder(golden)
    low = SparseStructureDecoder(ref.config, device="cpu", dtype=torch.bfloat16)
    low.load_state_dict({k: v.to(low.state_dict()[k].dtype) for k, v in g.weights.items()}, strict=True)
    with torch.no_grad():
        out = low.eval()(g.inputs["z"])
    assert out.dtype == torch.float32
    assert_close_rel(out, g.outputs["logits"], rtol=5e-2, what="bf16 blocks")


def test_config_errors():
    with pytest.raises(ConfigError, match="use_checkpoint"):
        from_config({"name": "SparseStructureDecoder", "args": {**TINY_ENC["args"], "use_checkpoint": True}})
    bad = {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [8], "norm_type": "batch"}
    with pytest.raises(ConfigError, match="norm_type"):
        from_config({"name": "SparseStructureDecoder", "args": bad})
    with pytest.raises(ConfigError, match="divisible by 32"):
        from_config({"name": "SparseStructureDecoder", "args": dict(bad, norm_type="group")})
    with pytest.raises(ConfigError, match="channels"):
        from_config({"name": "SparseStructureDecoder", "args": dict(bad, norm_type="layer", channels=[])})


def test_group_norm_variant_builds_and_runs():
    args = {"out_channels": 1, "latent_channels": 4, "num_res_blocks": 1, "num_res_blocks_middle": 1,
            "channels": [64, 32], "norm_type": "group"}
    dec = _random_init(from_config({"name": "SparseStructureDecoder", "args": args}, device="cpu"))
    with torch.no_grad():
        assert dec(torch.randn(1, 4, 2, 2, 2)).shape == (1, 1, 4, 4, 4)


@pytest.mark.cuda
def test_fp16_blocks_on_cuda(golden):
    """The released layout (use_fp16: fp16 convs in blocks) on the GPU, fp32 logits close to the fp32 golden."""
    g = golden("ss_decoder_forward")
    cfg = SparseStructureDecoder.Config.from_args(dict(g.config["args"], use_fp16=True))
    model = SparseStructureDecoder(cfg, device="cuda")
    assert model.state_dict()["blocks.0.conv1.weight"].dtype == torch.float16
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in g.weights.items()}, strict=True)
    with torch.no_grad():
        out = model.eval()(g.inputs["z"].cuda())
    assert out.dtype == torch.float32
    assert_close_rel(out, g.outputs["logits"], rtol=1e-2, what="fp16 blocks")
