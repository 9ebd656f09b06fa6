"""The tiny random snapshot: official layout and schema, deterministic bytes, every component loads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import MANIFESTS
from trellis2.trellis2_core.checkpoints import load_model, read_safetensors_header
from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.models import model_class
from trellis2.trellis2_core.testing import tiny_snapshot
from trellis2.trellis2_core.testing.tiny_snapshot import TINY_CONFIGS, write_tiny_snapshot
from trellis2.trellis2_core.weights import TEXTURING_FILE, resolve_pipeline


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> Path:
    return write_tiny_snapshot(tmp_path_factory.mktemp("tiny") / "snap", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _importable(name: str) -> bool:
    try:
        model_class(name)
    except ImportError:
        return False
    return True


def test_layout_schema_and_size(snap):
    official = json.loads((MANIFESTS / "pipeline.json").read_text())
    assert json.loads((snap / "pipeline.json").read_text()) == official  # roles, samplers, normalisations
    tex = json.loads((snap / TEXTURING_FILE).read_text())
    assert tex["name"] == "Trellis2TexturingPipeline"
    roles = {"shape_slat_encoder", "tex_slat_decoder", "tex_slat_flow_model_512", "tex_slat_flow_model_1024"}
    assert set(tex["args"]["models"]) == roles
    for key in ("tex_slat_sampler", "shape_slat_normalization", "tex_slat_normalization", "image_cond_model"):
        assert tex["args"][key] == official["args"][key]
    assert (snap / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors").is_file()
    assert (snap / "dinov3/config.json").is_file() and (snap / "dinov3/model.safetensors").is_file()
    size = sum(len(b) for b in _files(snap).values())
    assert size < 5e6, f"tiny snapshot is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_use_official_classes_and_arguments(snap, name):
    official = json.loads((MANIFESTS / f"{name}.json").read_text())["config"]
    written = json.loads(next(snap.rglob(f"{name}.json")).read_text())
    assert written["name"] == official["name"] and set(written["args"]) == set(official["args"])
    # What the pipeline depends on stays official: latent channels, in/out channels, number of up/down levels.
    for key in ("in_channels", "out_channels", "latent_channels", "resolution", "pred_subdiv", "dtype", "use_fp16"):
        if key in official["args"]:
            assert written["args"][key] == official["args"][key], key
    for key in ("up_block_type", "down_block_type"):
        if key in official["args"]:
            assert written["args"][key] == official["args"][key]  # 4 levels: factor 16 as released


def test_file_dtypes_follow_the_official_layout(snap):
    header = read_safetensors_header(snap / "ckpts/slat_flow_img2shape_dit_1_3B_512_bf16.safetensors")
    assert header["blocks.0.mlp.mlp.0.weight"].dtype == "BF16" and header["t_embedder.mlp.0.weight"].dtype == "F32"
    header = read_safetensors_header(snap / "ckpts/tex_dec_next_dc_f16c32_fp16.safetensors")
    assert header["blocks.0.0.conv.weight"].dtype == "F16" and header["from_latent.weight"].dtype == "F32"


def test_every_component_loads_strictly(snap):
    for config_file in ("pipeline.json", TEXTURING_FILE):
        files = resolve_pipeline(snap, config_file=config_file)
        assert files.dinov3_path == (snap / "dinov3").resolve()
        for role, m in files.models.items():
            config = json.loads(m.config_path.read_text())
            if not _importable(config["name"]):
                continue  # model class not written yet
            model = load_model(m, "cpu", dtype=torch.float32)
            assert all(p.dtype == torch.float32 for p in model.parameters()), role
            with safe_open(str(m.weights_path), "pt") as f:
                assert set(f.keys()) == set(model.state_dict()), role


def test_tiny_dinov3_folder_loads(snap):
    try:
        from trellis2.trellis2_core.conditioning import DinoV3Conditioner
    except ImportError:
        pytest.skip("conditioning not written yet")
    cond = DinoV3Conditioner.from_folder(snap / "dinov3", device="cpu", dtype=torch.float32)
    tokens = cond.features(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    dit = json.loads((snap / "ckpts/ss_flow_img_dit_1_3B_64_bf16.json").read_text())["args"]
    assert tokens.shape == (1, 1 + 4 + 4 * 4, dit["cond_channels"]) and torch.isfinite(tokens).all()


def test_deterministic_bytes_and_no_global_rng_side_effect(snap, tmp_path):
    state = torch.random.get_rng_state()
    again = write_tiny_snapshot(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _files(again) == _files(snap)
    other = _files(write_tiny_snapshot(tmp_path / "other", seed=1, dinov3=False))
    name = "ckpts/ss_flow_img_dit_1_3B_64_bf16.safetensors"
    assert other[name] != _files(snap)[name] and other["pipeline.json"] == _files(snap)["pipeline.json"]


def test_random_runs_stay_small(snap):
    if not _importable("SparseStructureDecoder"):
        pytest.skip("SparseStructureDecoder not written yet")
    decoder = load_model(snap / "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.json", "cpu", dtype=torch.float32)
    with torch.no_grad():
        occ = decoder(torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(0))) > 0
    pooled = torch.nn.functional.max_pool3d(occ.float(), 2, 2, 0) > 0.5
    assert 20 < int(pooled.sum()) < 2000  # SS_LOGIT_BIAS: a few hundred voxels on the 32^3 grid
    if not _importable("FlexiDualGridVaeDecoder"):
        return
    from trellis2.trellis2_core.sparse import SparseTensor

    coords = torch.argwhere(pooled[0, 0])[:50]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1).int()
    decoder = load_model(snap / "ckpts/shape_dec_next_dc_f16c32_fp16.json", "cpu", dtype=torch.float32)
    latent = SparseTensor(torch.randn(len(coords), 32, generator=torch.Generator().manual_seed(1)) * 5, coords)
    with torch.no_grad():
        _, subs = decoder(latent, return_subs=True)
    kept = [float((s.feats > 0).float().mean()) for s in subs]
    assert all(0 < k < 0.5 for k in kept[:-1]) and kept[-1] == 1.0, kept  # few children, then full 2x2x2 blocks


def test_cli_refuses_non_empty_folder(tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert tiny_snapshot.main([str(target), "--no-dinov3"]) == 2
    assert "not empty" in capsys.readouterr().err and not (target / "pipeline.json").exists()
    with pytest.raises(InputError, match=r"is not empty; pass an empty folder, or overwrite=True"):
        write_tiny_snapshot(target)
    assert tiny_snapshot.main([str(target), "--no-dinov3", "--force", "--seed", "3"]) == 0
    assert (target / "pipeline.json").is_file() and (target / "keep.txt").read_text() == "mine"
    assert "wrote tiny TRELLIS.2 snapshot" in capsys.readouterr().out
