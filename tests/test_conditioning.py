"""DINOv3 conditioning (SPEC 13): golden tokens, offline loading from a Hugging Face folder, error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import assert_close_rel
from trellis2.trellis2_core.conditioning import DinoV3Conditioner
from trellis2.trellis2_core.errors import CheckpointError, InputError
from trellis2.trellis2_core.image import preprocess_image

transformers = pytest.importorskip("transformers")
from transformers import DINOv3ViTConfig, DINOv3ViTModel  # noqa: E402

# Serialisation-only keys of config.json, not constructor arguments.
_NOT_ARGS = {"transformers_version", "model_type", "_name_or_path", "architectures"}


@pytest.fixture
def g(golden):
    return golden("image_cond_dinov3")


def _golden_model(g) -> DINOv3ViTModel:
    cfg = DINOv3ViTConfig(**{k: v for k, v in g.config["dinov3_config"].items() if k not in _NOT_ARGS})
    model = DINOv3ViTModel(cfg)
    sd = g.weights_with_prefix("dino.")  # transformers 5 names: layers under 'model.layer.N'
    if "layer.0.norm1.weight" in model.state_dict():  # transformers 4.x keeps them at 'layer.N'
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model


def _golden_image(g) -> Image.Image:
    pre = preprocess_image(Image.fromarray(g.inputs["rgba_input_u8"].numpy(), "RGBA"))
    assert np.array_equal(np.asarray(pre), g.outputs["preprocessed_rgb_u8"].numpy())
    return pre


def _check_golden(cond: DinoV3Conditioner, g) -> None:
    size = g.config["dino_image_size"]
    image = _golden_image(g)
    assert_close_rel(cond.pixels(image, size), g.outputs["dino_input_normalized"], what="normalised input")
    tokens = cond.encode(image, size)
    assert tokens.shape == (1, 5 + (size // 16) ** 2, 64) and tokens.dtype == torch.float32
    assert_close_rel(tokens, g.outputs["cond_tokens"], what="cond tokens")


def test_golden_tokens(g):
    _check_golden(DinoV3Conditioner(_golden_model(g)), g)


def test_final_affine_norm_is_not_used(g):
    model = _golden_model(g)
    with torch.no_grad():
        model.norm.weight.mul_(3.0).add_(1.0)
        model.norm.bias.add_(2.0)
    _check_golden(DinoV3Conditioner(model), g)


def test_from_folder_offline(g, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _golden_model(g).save_pretrained(tmp_path / "dino")
    assert (tmp_path / "dino" / "config.json").is_file() and (tmp_path / "dino" / "model.safetensors").is_file()
    cond = DinoV3Conditioner.from_folder(tmp_path / "dino", "cpu", torch.float32)
    assert not cond.model.training
    _check_golden(cond, g)
    low = DinoV3Conditioner.from_folder(tmp_path / "dino", "cpu", torch.bfloat16)
    assert low.dtype == torch.bfloat16
    tokens = low.encode(_golden_image(g), g.config["dino_image_size"])
    assert tokens.dtype == torch.float32  # post-norm in fp32 whatever the model dtype
    assert_close_rel(tokens, g.outputs["cond_tokens"], rtol=5e-2, what="bf16 tokens")
    assert low.to(dtype=torch.float32) is low and low.dtype == torch.float32


def _rewrite_layout(folder, layer_prefix: str) -> None:
    """Rename the layer keys of a saved folder to ``layer_prefix`` ('layer.' or 'model.layer.')."""
    sd = load_file(folder / "model.safetensors")
    sd = {(layer_prefix + k.split("layer.", 1)[1] if "layer." in k else k): v for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors", {"format": "pt"})


@pytest.mark.parametrize("layer_prefix", ["layer.", "model.layer."])
def test_from_folder_accepts_both_key_layouts(g, tmp_path, monkeypatch, layer_prefix):
    """The released checkpoint (transformers 4.56) names layers 'layer.N'; transformers 5 modules 'model.layer.N'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "dino"
    model = _golden_model(g)
    if layer_prefix == "model.layer." and "layer.0.norm1.weight" in model.state_dict():
        pytest.skip("transformers 4.x reads only the released 'layer.N' layout (which 5.x save_pretrained also writes)")
    model.save_pretrained(folder)
    _rewrite_layout(folder, layer_prefix)
    _check_golden(DinoV3Conditioner.from_folder(folder), g)


def test_from_folder_errors(g, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="config.json and model.safetensors"):
        DinoV3Conditioner.from_folder(tmp_path / "nowhere")
    folder = tmp_path / "dino"
    _golden_model(g).save_pretrained(folder)
    _rewrite_layout(folder, "layer.")
    sd = load_file(folder / "model.safetensors")
    del sd["layer.1.mlp.up_proj.weight"]
    sd["extra.tensor"] = torch.zeros(3)
    save_file(sd, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing_keys.*up_proj.*unexpected_keys.*extra\.tensor"):
        DinoV3Conditioner.from_folder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="dinov2")))
    with pytest.raises(CheckpointError, match="model_type 'dinov2'"):
        DinoV3Conditioner.from_folder(folder)


def test_from_hub_gated_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "403 Client Error: access to model is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match="gated.*accept its licence.*HF_TOKEN.*from_folder"):
        DinoV3Conditioner.from_hub()

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="download failed.*from_folder"):
        DinoV3Conditioner.from_hub()


def test_negative_and_input_errors(g):
    cond = DinoV3Conditioner(_golden_model(g))
    tokens = torch.randn(1, 21, 64)
    neg = cond.negative(tokens)
    assert neg.shape == tokens.shape and neg.dtype == tokens.dtype and not neg.any()
    image = Image.new("RGB", (20, 20), (10, 20, 30))
    for bad in (60, 0, 64.0):
        with pytest.raises(InputError, match="multiple of the patch size 16"):
            cond.encode(image, bad)
    with pytest.raises(InputError, match="PIL image"):
        cond.encode(np.zeros((20, 20, 3), np.uint8), 64)
    assert cond.encode(image, 32).shape == (1, 5 + 4, 64)  # any multiple of 16 (RoPE handles the grid)
