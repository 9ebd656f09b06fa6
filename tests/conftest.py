"""Shared test fixtures. Golden vectors and manifests are copied into tests/data so tests never need ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
MANIFESTS = DATA / "manifests"


class Golden:
    """One golden folder: config (dict), weights / inputs / outputs (name -> tensor)."""

    def __init__(self, name: str):
        root = GOLDEN / name
        if not root.is_dir():
            raise FileNotFoundError(f"no golden folder {root}")
        self.name = name
        self.config = json.loads((root / "config.json").read_text())
        self.inputs = load_file(root / "inputs.safetensors")
        self.outputs = load_file(root / "outputs.safetensors")
        w = root / "weights.safetensors"
        self.weights = load_file(w) if w.exists() else {}

    def weights_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weights whose key starts with ``prefix``, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.weights.items() if k.startswith(prefix)}


@pytest.fixture
def golden():
    return Golden


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, what: str = "") -> None:
    """Relative error of the whole tensor, ||a - e|| / ||e||, within ``rtol``; shapes must match."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).norm() / e.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e} (max abs diff {(a - e).abs().max():.3e})"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA); run on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
