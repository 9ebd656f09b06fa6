"""Every official checkpoint's manifest (all keys, shapes, dtypes) matches the module our config builds."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MANIFESTS
from trellis2.trellis2_core.models import from_config

_DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "C64": torch.complex64}
NAMES = sorted(p.stem for p in MANIFESTS.glob("*.json") if not p.stem.startswith("_") and p.stem != "pipeline")


def test_all_eleven_checkpoints_are_covered():
    assert len(NAMES) == 11, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_manifest_keys_shapes_dtypes(name):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    model = from_config(manifest["config"], device="meta")
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    # Persistent buffers the reference saves (SS flow 'rope_phases') are recomputed by us, never loaded.
    theirs = {k: (tuple(v["shape"]), _DT[v["dtype"]]) for k, v in manifest["params"].items()}
    missing, unexpected = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not unexpected, f"missing {missing[:20]}, unexpected {unexpected[:20]}"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not wrong, f"{len(wrong)} keys differ (ours, manifest): {dict(list(wrong.items())[:20])}"
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_to_the_official_args(name):
    from trellis2.trellis2_core.models import parse_config

    config = json.loads((MANIFESTS / f"{name}.json").read_text())["config"]
    _, cfg = parse_config(config)
    args = cfg.to_args()
    # Our config may add the reference's defaults for optional args; every official arg must come back unchanged.
    assert {k: args[k] for k in config["args"]} == config["args"]
    hash(cfg)


def test_unknown_config_key_is_rejected_by_name():
    from trellis2.trellis2_core.errors import ConfigError

    config = json.loads((MANIFESTS / "ss_dec_conv3d_16l8_fp16.json").read_text())["config"]
    bad = {"name": config["name"], "args": {**config["args"], "num_res_block": 2}}
    with pytest.raises(ConfigError, match="num_res_block"):
        from_config(bad)
