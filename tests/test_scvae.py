"""SC-VAE encoders/decoders: goldens (shape + tex decoders, encoder + cache-guided decoding), fp16 layout, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_close_rel
from trellis2.trellis2_core.errors import ConfigError, InputError
from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.sparse import SparseTensor


def load(config, weights, dtype=None):
    """Build on meta, load the golden weights cast to the module's dtypes (assign keeps the loaded dtype)."""
    model = from_config(config, device="meta", dtype=dtype)
    want = model.state_dict()
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in weights.items()}, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def dec_golden():
    from conftest import Golden

    g = Golden("scvae_decoders")
    shape = load(g.config["shape_dec"], g.weights_with_prefix("shape_dec."))
    tex = load(g.config["tex_dec"], g.weights_with_prefix("tex_dec."))
    latent = SparseTensor(g.inputs["latent_feats"], g.inputs["latent_coords"])
    with torch.no_grad():
        raw, subs = shape(latent, return_subs=True)
    return g, shape, tex, latent, raw, subs


def test_shape_decoder_raw_output_and_subdivisions(dec_golden):
    g, _, _, _, raw, subs = dec_golden
    out = g.outputs
    assert torch.equal(raw.coords, out["shape_out_coords"])
    assert_close_rel(raw.feats, out["shape_out_feats_raw7"], what="raw7")
    assert len(subs) == 2
    for i, sub in enumerate(subs):
        assert torch.equal(sub.coords, out[f"shape_subs{i}_coords"]), f"level {i} coords"
        assert torch.equal(sub.feats > 0, out[f"shape_subs{i}_logits"] > 0), f"level {i} decisions"
        assert_close_rel(sub.feats, out[f"shape_subs{i}_logits"], what=f"subs{i}")


def test_fdg_head_matches_golden_mesh_vertices(dec_golden):
    g, shape, _, _, raw, _ = dec_golden
    shape.set_resolution(16)
    offset, flags, split = shape.head(raw.feats)
    assert offset.shape == (len(raw), 3) and flags.dtype == torch.bool and split.shape == (len(raw), 1)
    assert float(offset.min()) > -0.5 and float(offset.max()) < 1.5 and float(split.min()) > 0
    # One mesh vertex per voxel, in voxel order: (coords + offset) / R - 0.5 (SPEC 10 step 1).
    verts = (raw.coords[:, 1:].float() + offset) / shape.resolution - 0.5
    assert_close_rel(verts, g.outputs["mesh_vertices"], what="vertices")
    assert torch.equal(flags, raw.feats[:, 3:6] > 0)


def test_tex_decoder_with_guide_subs(dec_golden):
    g, _, tex, latent, _, subs = dec_golden
    with torch.no_grad():
        out = tex(latent, guide_subs=subs)
    assert torch.equal(out.coords, g.outputs["shape_out_coords"])
    assert_close_rel(out.feats * 0.5 + 0.5, g.outputs["tex_out_feats"], what="tex")


def test_upsample_coords(dec_golden):
    g, shape, _, latent, _, subs = dec_golden
    assert torch.equal(shape.upsample(latent, upsample_times=2), g.outputs["upsample2_coords"])
    assert torch.equal(shape.upsample(latent, 1), subs[1].coords)
    assert torch.equal(shape.upsample(latent, 0), latent.coords)
    with pytest.raises(InputError, match="upsample_times"):
        shape.upsample(latent, 3)


def test_decoder_argument_errors(dec_golden):
    _, shape, tex, latent, _, subs = dec_golden
    with pytest.raises(InputError, match="pred_subdiv=true"):
        shape(latent, guide_subs=subs)
    with pytest.raises(InputError, match="return_subs"):
        tex(latent, guide_subs=subs, return_subs=True)
    with pytest.raises(InputError, match="no guide_subs"):
        tex(latent)
    with pytest.raises(InputError, match="2 levels"):
        tex(latent, guide_subs=subs[:1])
    with pytest.raises(InputError, match="same coords"):
        tex(latent, guide_subs=[subs[1], subs[0]])


def test_encoder_latent_and_cache_guided_tex_decoding(golden):
    g = golden("scvae_encoder")
    enc = load(g.config["shape_enc"], g.weights_with_prefix("enc."))
    tex = load(g.config["tex_dec"], g.weights_with_prefix("tex_dec."))
    inp, out = g.inputs, g.outputs
    with torch.no_grad():
        z = enc(SparseTensor(inp["vertices"], inp["coords"]), SparseTensor(inp["intersected"], inp["coords"]))
        assert torch.equal(z.coords, out["latent_coords"])
        assert_close_rel(z.feats, out["latent_feats"], what="latent mean")
        # The sampler hands back new features on the same coords: replace() must keep the encoder's records.
        decoded = tex(z.replace(z.feats.clone()))
    assert torch.equal(decoded.coords, inp["coords"])  # the encoder's input voxels, same row order
    assert torch.equal(decoded.coords, out["tex_out_coords"])
    assert_close_rel(decoded.feats * 0.5 + 0.5, out["tex_out_feats"], what="tex")
    with pytest.raises(InputError, match="intersected"):
        enc(SparseTensor(inp["vertices"], inp["coords"]), SparseTensor(inp["intersected"][:, :2], inp["coords"]))


def test_fp16_layout_runs_with_fp32_io(dec_golden):
    g = dec_golden[0]
    cfg = copy.deepcopy(g.config["shape_dec"])
    cfg["args"]["use_fp16"] = True
    model = load(cfg, g.weights_with_prefix("shape_dec."))
    sd = model.state_dict()
    assert sd["blocks.0.1.conv1.weight"].dtype == torch.float16 and sd["blocks.0.1.to_subdiv.weight"].dtype == torch.float16
    assert sd["blocks.0.1.norm1.weight"].dtype == torch.float32 and sd["from_latent.weight"].dtype == torch.float32
    with torch.no_grad():
        raw, subs = model(dec_golden[3], return_subs=True)
    assert raw.dtype == torch.float32 and subs[0].dtype == torch.float16  # logits from the fp16 Linear (SPEC 17.9)
    # No decision of this golden sits within fp16 noise of 0, so the voxels are the same.
    assert torch.equal(raw.coords, g.outputs["shape_out_coords"])
    assert_close_rel(raw.feats, g.outputs["shape_out_feats_raw7"], rtol=1e-2, what="fp16 raw7")


def test_config_errors_name_the_field():
    args = {
        "in_channels": 6, "model_channels": [8, 16], "latent_channels": 4, "num_blocks": [0, 1],
        "block_type": ["SparseConvNeXtBlock3d"] * 2, "down_block_type": ["SparseResBlockS2C3d"],
        "block_args": [{"use_checkpoint": True}, {}],
    }
    from_config({"name": "SparseUnetVaeEncoder", "args": args})  # valid, use_checkpoint accepted
    bad = [
        ({"down_block_type": ["SparseResBlockDownsample3d"]}, "down_block_type"),
        ({"block_args": [{"mlp_ratio": 2}, {}]}, "block_args"),
        ({"num_blocks": [0, 1, 1]}, "model_channels and num_blocks"),
        ({"model_channels": [8, 12]}, "cannot be rearranged"),
    ]
    for change, match in bad:
        with pytest.raises(ConfigError, match=match):
            from_config({"name": "SparseUnetVaeEncoder", "args": {**args, **change}})


def test_decoders_search_neighbours_once_and_derive_the_rest(dec_golden, monkeypatch):
    """Only the latent level's neighbour map is searched; every subdivided level derives its map from its parent's
    (``neighbours_from_parent``), and the decoded voxels and features stay the golden ones."""
    from trellis2.trellis2_core.sparse import conv as sconv

    g, shape, tex, latent, raw, subs = dec_golden
    searched = []
    build = sconv._reference.build_neighbours
    monkeypatch.setattr(sconv._reference, "build_neighbours", lambda c: searched.append(len(c)) or build(c))
    fresh = SparseTensor(latent.feats.clone(), latent.coords.clone())  # no cached maps
    with torch.no_grad():
        again, again_subs = shape(fresh, return_subs=True)
        tex(SparseTensor(latent.feats.clone(), latent.coords.clone()), guide_subs=again_subs)
    assert searched == [len(latent), len(latent)]  # one search per decoder: its latent level
    assert torch.equal(again.coords, raw.coords) and torch.equal(again.feats, raw.feats)
