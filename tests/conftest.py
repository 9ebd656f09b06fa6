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


# A two-block bf16 DiT config for the CUDA-graph tests (test_cuda_graphs*.py): small enough to be host-bound.
TINY_GRAPH_DIT = {
    "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 64, "cond_channels": 16,
    "num_blocks": 2, "num_heads": 2, "mlp_ratio": 4.0, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "bfloat16",
}  # fmt: skip


def random_sparse(lengths, channels: int, *, res: int = 40, seed: int = 1):
    """A CPU SparseTensor with len(lengths) items of distinct random voxels (coords < res) and random features."""
    from trellis2.trellis2_core.sparse import SparseTensor

    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(lengths):
        cells = torch.randperm(res**3, generator=g)[:n].sort().values
        xyz = torch.stack([cells // (res * res), cells // res % res, cells % res], dim=1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)


def random_model(name: str, config: dict, *, device: str = "cpu", seed: int = 0, **args) -> torch.nn.Module:
    """Model ``name`` built from ``config`` (overridden by ``args``) in eval mode, every parameter random x 0.3 (the
    reference zero-initialises some layers; random everywhere exercises every path)."""
    from trellis2.trellis2_core.models import from_config

    torch.manual_seed(seed)
    m = from_config({"name": name, "args": {**config, **args}}, device=device).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


# A 3-block DiT config small enough for CPU tests of the flow models' plumbing (streaming, Components).
TINY_DIT = {
    "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 48, "cond_channels": 16,
    "num_blocks": 3, "num_heads": 2, "mlp_ratio": 5.3334, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "float32",
}  # fmt: skip


def tiny_slat_inputs():
    """(x, t, cond) for a TINY_DIT SLatFlowModel: 37 random voxels of an 8^3 grid, one timestep, 5 context tokens."""
    from trellis2.trellis2_core.sparse import SparseTensor

    g = torch.Generator().manual_seed(1)
    cells = torch.randperm(8**3, generator=g)[:37]
    coords = torch.stack([torch.zeros_like(cells), cells // 64, cells // 8 % 8, cells % 8], 1).int()
    x = SparseTensor(torch.randn(37, 8, generator=g), coords)
    return x, torch.tensor([700.0]), torch.randn(1, 5, 16, generator=g)


def check_backend_order(kernels, monkeypatch, call=None) -> None:
    """The call-time backend order every ``kernels/`` package shares (STYLE.md item 6, ``kernels/_backend.py``):
    argument > innermost ``use_backend`` context > environment variable (read at each call) > "auto", the
    "reference" alias, and errors naming a bad environment value or argument. ``call(backend=None)``: a public
    entry point of the package that must resolve through that order (default: ``kernels.requested_backend``)."""
    call = call or (lambda backend=None: kernels.requested_backend(backend))
    assert kernels.requested_backend() == "auto"
    monkeypatch.setenv(kernels.ENV_VAR, "Triton")
    assert kernels.requested_backend() == "triton"  # read at call time
    with kernels.use_backend("reference"):
        assert kernels.requested_backend() == "torch"
        with kernels.use_backend("auto"):
            assert kernels.requested_backend() == "auto"
        assert kernels.requested_backend("auto") == "auto"
        assert kernels.requested_backend("triton") == "triton"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{kernels.ENV_VAR}.*'fast'"):
        call()
    with pytest.raises(ValueError, match="backend argument"):
        call(backend="cuda")


def block_image():
    """A 96 x 80 RGBA image: one opaque orange block on a transparent background."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((96, 80, 4), np.uint8)
    rgba[20:70, 15:60] = (200, 60, 30, 255)
    return Image.fromarray(rgba, "RGBA")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA); run on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
