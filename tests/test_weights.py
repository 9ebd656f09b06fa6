"""Checkpoint verification, strict loading and pipeline resolution (trellis2_core.checkpoints / .weights).

Every bad input has a test that checks the message: missing file, truncated safetensors, corrupt header,
checkpoint of another model, mis-shaped config, unknown config key, offline / unreachable / gated downloads.
Runs on a tiny snapshot in the official layout (no network: downloads are refused or mocked).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import MANIFESTS
from trellis2.trellis2_core import checkpoints, hub, weights
from trellis2.trellis2_core.checkpoints import load_model, read_safetensors_header
from trellis2.trellis2_core.errors import CheckpointError, ConfigError
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot
from trellis2.trellis2_core.weights import resolve_pipeline

SS_FLOW = "ckpts/ss_flow_img_dit_1_3B_64_bf16"
SHAPE_DEC = "ckpts/shape_dec_next_dc_f16c32_fp16"
TEX_FLOW = "ckpts/slat_flow_imgshape2tex_dit_1_3B_512_bf16"
SS_DEC = "TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_tiny_snapshot(tmp_path_factory.mktemp("tiny") / "TRELLIS.2-4B", dinov3=False)


@pytest.fixture
def snap(pristine, tmp_path) -> Path:
    """A private copy of the tiny snapshot (tests corrupt it)."""
    return Path(shutil.copytree(pristine, tmp_path / "TRELLIS.2-4B"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads: HF_HUB_OFFLINE at call time and an empty private cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_cache"


# ------------------------------------------------------------------------------------------- strict loading
def test_loads_values_casts_and_never_unpickles(snap, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("torch.load must never be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = load_model(snap / f"{SS_FLOW}.json", "cpu", dtype=torch.float32)
    with safe_open(str(snap / f"{SS_FLOW}.safetensors"), "pt") as f:
        qkv = f.get_tensor("blocks.0.self_attn.to_qkv.weight")
        t_emb = f.get_tensor("t_embedder.mlp.0.weight")
    assert qkv.dtype == torch.bfloat16 and t_emb.dtype == torch.float32  # official mixed layout in the file
    sd = model.state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    assert torch.equal(sd["blocks.0.self_attn.to_qkv.weight"], qkv.float())
    assert torch.equal(sd["t_embedder.mlp.0.weight"], t_emb)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # dtype=None keeps the config's precision (bf16 blocks), the (config, path) form works too.
    config = json.loads((snap / f"{SS_FLOW}.json").read_text())
    native = load_model((config, snap / f"{SS_FLOW}.safetensors"), "cpu")
    assert native.state_dict()["blocks.0.self_attn.to_qkv.weight"].dtype == torch.bfloat16
    assert native.state_dict()["t_embedder.mlp.0.weight"].dtype == torch.float32


def test_missing_weights_and_config(snap):
    (snap / f"{SS_FLOW}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ss_flow_img_dit_1_3B_64_bf16\.safetensors does not exist"):
        load_model(snap / f"{SS_FLOW}.json", "cpu")
    (snap / f"{SHAPE_DEC}.json").unlink()
    with pytest.raises(CheckpointError, match=r"shape_dec_next_dc_f16c32_fp16\.json does not exist"):
        load_model(snap / f"{SHAPE_DEC}.safetensors", "cpu")


@pytest.mark.parametrize("keep", [5, 100, -100], ids=["in_length", "in_header", "in_data"])
def test_truncated_file(snap, keep):
    path = snap / f"{SHAPE_DEC}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # keep > 0: the first bytes only; keep < 0: all but the last bytes
    with pytest.raises(CheckpointError) as e:
        load_model(snap / f"{SHAPE_DEC}.json", "cpu")
    msg = str(e.value)
    assert str(path) in msg and "truncated or corrupt" in msg and "delete it and download again" in msg


def test_corrupt_header(snap):
    path = snap / f"{SHAPE_DEC}.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#not json!!#"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"header is not valid JSON.*delete it and download again"):
        read_safetensors_header(path)


def test_offsets_outside_the_file(snap):
    path = snap / f"{SHAPE_DEC}.safetensors"
    header = {k: {"dtype": v.dtype, "shape": list(v.shape), "data_offsets": [v.begin, v.end]}
              for k, v in read_safetensors_header(path).items()}  # fmt: skip
    key = sorted(header)[0]
    header[key]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    body = path.read_bytes()
    n = int.from_bytes(body[:8], "little")
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body[8 + n :])
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' ends at byte .*delete it and download again"):
        read_safetensors_header(path)


def test_checkpoint_of_another_model_is_named(snap, monkeypatch):
    shutil.copy(snap / f"{SHAPE_DEC}.safetensors", snap / f"{SS_FLOW}.safetensors")

    def no_data(*a, **k):
        raise AssertionError("tensor data must not be read before the keys are checked")

    monkeypatch.setattr(checkpoints, "safe_open", no_data)
    with pytest.raises(CheckpointError) as e:
        load_model(snap / f"{SS_FLOW}.json", "cpu")
    msg = str(e.value)
    assert str(snap / f"{SS_FLOW}.safetensors") in msg and "SparseStructureFlowModel" in msg
    assert "looks like the checkpoint of a shape SC-VAE decoder" in msg and "swapped" in msg
    missing = msg.split("missing keys (")[1].split("\n")[0]
    assert missing.count(", ") == 19 and "... and" in missing  # at most 20 keys listed
    assert "unexpected keys (68): " in msg and "blocks.0.1.to_subdiv.weight" in msg


def test_mismatched_shape_from_edited_config(snap):
    path = snap / f"{TEX_FLOW}.json"
    config = json.loads(path.read_text())
    config["args"]["in_channels"] = 32  # the texture flow's input is 64 = noise 32 + shape 32
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(path, "cpu")
    msg = str(e.value)
    assert "mis-shaped keys (1): input_layer.weight (file [64, 64], model [64, 32])" in msg
    assert "looks like the checkpoint of a texture latent flow model" in msg and str(path) in msg
    config["args"]["in_channels"], config["args"]["model_channels"], config["args"]["num_heads"] = 64, 96, 3
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"widths/depths differ") as e:
        load_model(path, "cpu")
    assert "mis-shaped keys (" in str(e.value)


def test_unknown_config_key(snap):
    path = snap / f"{SS_DEC}.json"
    config = json.loads(path.read_text())
    config["args"]["num_res_blockz"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load_model(path, "cpu")
    assert str(path) in str(e.value) and "num_res_blockz" in str(e.value)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"is not valid JSON.*download again"):
        load_model(path, "cpu")


def test_rope_phases_dropped_only_for_ss_flow(snap):
    extra = {"rope_phases": torch.polar(torch.ones(4096, 16), torch.zeros(4096, 16))}  # complex64, reference buffer
    for name in (SS_FLOW, TEX_FLOW):
        path = snap / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file({**tensors, **extra}, str(path))
    load_model(snap / f"{SS_FLOW}.json", "cpu")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): rope_phases"):
        load_model(snap / f"{TEX_FLOW}.json", "cpu")


# ------------------------------------------------------------------------------------------- resolving
def test_resolve_local_snapshot(snap):
    files = resolve_pipeline(snap, dinov3=False)
    assert files.name == "Trellis2ImageTo3DPipeline" and files.default_pipeline_type == "1024_cascade"
    assert set(files.models) == set(weights.OFFICIAL_MODELS)
    ss_dec = files.models["sparse_structure_decoder"]
    assert ss_dec.weights_path == snap.resolve() / f"{SS_DEC}.safetensors"
    assert ss_dec.path == weights.OFFICIAL_MODELS["sparse_structure_decoder"]
    assert files.samplers["shape_slat_sampler"].params["guidance_interval"] == (0.6, 1.0)
    assert len(files.normalizations["tex_slat_normalization"].std) == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        files.dinov3_path = snap  # type: ignore[misc]
    with pytest.raises(TypeError):
        files.models["x"] = ss_dec  # type: ignore[index]
    only = resolve_pipeline(snap, roles=["tex_slat_decoder"], dinov3=False)
    assert list(only.models) == ["tex_slat_decoder"]
    with pytest.raises(ConfigError, match=r"roles: \['nope'\] are not in"):
        resolve_pipeline(snap, roles=["nope"], dinov3=False)


def test_cross_repo_lookup_order(snap, offline):
    name = "ss_dec_conv3d_16l8_fp16"
    first = snap / "microsoft/TRELLIS-image-large/ckpts"
    sibling = snap.parent / "TRELLIS-image-large/ckpts"
    same = snap / "ckpts"
    for where in (first, sibling, same):
        where.mkdir(parents=True, exist_ok=True)
        for ext in (".json", ".safetensors"):
            shutil.copy(snap / f"{SS_DEC}{ext}", where / f"{name}{ext}")

    def found() -> Path:
        return resolve_pipeline(snap, roles=["sparse_structure_decoder"], dinov3=False).models[
            "sparse_structure_decoder"
        ].weights_path.parent

    order = [first, snap / "TRELLIS-image-large/ckpts", sibling, same]
    for expected in order:
        assert found() == expected.resolve()
        shutil.rmtree(expected) if expected != same else (expected / f"{name}.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_pipeline(snap, roles=["sparse_structure_decoder"], dinov3=False, cache_dir=offline)
    msg = str(e.value)
    assert "microsoft/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.json: offline (HF_HUB_OFFLINE" in msg
    assert str(snap.resolve() / f"{SS_DEC}.json") in msg  # where to put it


def test_local_missing_files_listed(snap, offline):
    (snap / f"{SHAPE_DEC}.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_pipeline(snap, cache_dir=offline)  # also wants DINOv3, which this snapshot lacks
    msg = str(e.value)
    assert str(snap.resolve() / f"{SHAPE_DEC}.safetensors") in msg
    assert str(snap.resolve() / "dinov3/model.safetensors") in msg
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m/config.json: offline" in msg


def test_verify_catches_truncated_download(snap):
    path = snap / f"{TEX_FLOW}.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        resolve_pipeline(snap, dinov3=False)
    resolve_pipeline(snap, dinov3=False, verify=False)


def test_offline_missing_pipeline(offline, tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_pipeline("nobody/no-such-trellis", cache_dir=offline)
    msg = str(e.value)
    assert "nobody/no-such-trellis/pipeline.json: offline (HF_HUB_OFFLINE" in msg and "<folder>/pipeline.json" in msg
    with pytest.raises(CheckpointError) as e:
        resolve_pipeline(weights.DEFAULT_REPO, cache_dir=offline)
    msg = str(e.value)  # the official snapshot's files are listed
    assert "<folder>/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16.safetensors" in msg
    assert "<folder>/ckpts/slat_flow_imgshape2tex_dit_1_3B_1024_bf16.safetensors" in msg
    assert "<folder>/dinov3/model.safetensors" in msg
    with pytest.raises(CheckpointError, match=r"neither an existing folder nor a Hugging Face repo id"):
        resolve_pipeline(tmp_path / "no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no pipeline.json"):
        resolve_pipeline(tmp_path / "empty")


def test_unreachable_hub_falls_back_to_cache_without_retries(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*a, **k):
        calls.append(k["local_files_only"])
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(CheckpointError, match=r"could not be reached \(cannot connect to 127.0.0.1:9"):
        resolve_pipeline("nobody/no-such-trellis", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")
    assert calls == [True]  # the probe failed: huggingface_hub (which retries for ~25 s) is asked for the cache only


class _FakeHub:
    """hf_hub_download stand-in: an empty cache, and a Hub serving local folders; records every download."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.calls = repos, gated, []

    def __call__(self, repo_id, filename, *, revision=None, local_files_only=False, local_dir=None, **kwargs):
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

        if local_files_only:  # an empty cache
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached")
        self.calls.append((repo_id, filename, revision))
        if repo_id in self.gated:
            err = GatedRepoError.__new__(GatedRepoError)  # its constructor wants an HTTP response
            Exception.__init__(err, "403 gated")
            raise err
        if local_dir is None:
            return str(self.repos[repo_id] / filename)
        (Path(local_dir) / filename).parent.mkdir(parents=True, exist_ok=True)
        return shutil.copy(self.repos[repo_id] / filename, Path(local_dir) / filename)


def test_download_only_requested_roles(snap, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda *a: None)
    fake = _FakeHub({weights.DEFAULT_REPO: snap, "microsoft/TRELLIS-image-large": snap / "TRELLIS-image-large"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    files = resolve_pipeline(weights.DEFAULT_REPO, roles=["sparse_structure_decoder", "tex_slat_decoder"], dinov3=False)
    pinned = weights.PINNED_REVISIONS
    main, large = weights.DEFAULT_REPO, "microsoft/TRELLIS-image-large"
    assert len(fake.calls) == 5 and set(fake.calls) == {
        (main, "pipeline.json", pinned[main]),
        (main, "ckpts/tex_dec_next_dc_f16c32_fp16.json", pinned[main]),
        (main, "ckpts/tex_dec_next_dc_f16c32_fp16.safetensors", pinned[main]),
        (large, "ckpts/ss_dec_conv3d_16l8_fp16.json", pinned[large]),
        (large, "ckpts/ss_dec_conv3d_16l8_fp16.safetensors", pinned[large]),
    }
    load_model(files.models["sparse_structure_decoder"], "cpu", dtype=torch.float32)


def test_gated_dinov3_message(snap, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda *a: None)
    fake = _FakeHub({}, gated=(weights.DINOV3_REPO,))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(CheckpointError) as e:
        resolve_pipeline(snap, roles=[])
    msg = str(e.value)
    assert f"accept its licence at https://huggingface.co/{weights.DINOV3_REPO}" in msg
    assert "huggingface-cli login" in msg
    assert str(snap.resolve() / "dinov3/config.json") in msg and str(snap.resolve() / "dinov3/model.safetensors") in msg
    assert len(fake.calls) == 1  # after the refusal, the repo's other file is only looked up in the cache
    assert "not in the Hugging Face cache (access to the repo was refused" in msg


def test_download_into_local_dir_then_use_it_offline(snap, monkeypatch, tmp_path):
    import huggingface_hub

    dino = tmp_path / "dino_hub"
    dino.mkdir()
    (dino / "config.json").write_text('{"model_type": "dinov3_vit"}')
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 8)}, str(dino / "model.safetensors"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_unreachable", lambda *a: None)
    repos = {
        weights.DEFAULT_REPO: snap,
        "microsoft/TRELLIS-image-large": snap / "TRELLIS-image-large",
        weights.DINOV3_REPO: dino,
    }
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _FakeHub(repos))
    models_dir = tmp_path / "ComfyUI/models/trellis2/TRELLIS.2-4B"
    got = resolve_pipeline(weights.DEFAULT_REPO, local_dir=models_dir)
    assert got.root == models_dir and got.dinov3_path == models_dir / "dinov3"
    assert got.models["sparse_structure_decoder"].config_path == models_dir / f"{SS_DEC}.json"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = resolve_pipeline(models_dir)  # the download folder is a complete local source
    assert {r: m.weights_path for r, m in again.models.items()} == {r: m.weights_path for r, m in got.models.items()}
    assert again.dinov3_path == models_dir / "dinov3"


_MANIFESTS = sorted(p for p in MANIFESTS.glob("*.json") if not p.stem.startswith("_") and p.stem != "pipeline")
_KIND = {
    "ss_flow": "sparse-structure flow", "slat_flow_img2shape": "shape latent flow",
    "slat_flow_imgshape2tex": "texture latent flow", "shape_dec": "shape SC-VAE decoder",
    "tex_dec": "texture SC-VAE decoder", "shape_enc": "SC-VAE encoder", "tex_enc": "SC-VAE encoder",
    "ss_dec": "sparse-structure decoder", "ss_enc": "sparse-structure encoder",
}  # fmt: skip


@pytest.mark.parametrize("manifest", _MANIFESTS, ids=lambda p: p.stem)
def test_official_file_layout_passes_the_key_audit(manifest):
    """A file with exactly the official keys/shapes (+ the SS flow's rope_phases buffer) fits its official config,
    and the 'checkpoint of another model' heuristic names every official checkpoint correctly."""
    from trellis2.trellis2_core.models import from_config

    m = json.loads(manifest.read_text())
    header = {k: checkpoints.TensorInfo(v["dtype"], tuple(v["shape"]), 0, 0)
              for k, v in {**m["params"], **m.get("persistent_buffers", {})}.items()}  # fmt: skip
    expected = from_config(m["config"], device="meta").state_dict()
    checkpoints.check_keys(expected, header, weights_path=Path("x.safetensors"), config_source="x.json",
                           model_name=m["config"]["name"])  # fmt: skip
    kind = checkpoints.guess_checkpoint_kind({k: v.shape for k, v in header.items()})
    prefix = next(p for p in sorted(_KIND, key=len, reverse=True) if manifest.stem.startswith(p))
    assert _KIND[prefix] in kind, (manifest.stem, kind)
