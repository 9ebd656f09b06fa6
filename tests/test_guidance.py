"""pipeline/guidance.run_sampler: the zero negative condition reaches the TRELLIS.2 flows (which then skip its
cross-attention) and the per-batch-size call counts it gives the CUDA-graph wrapper match the sampler's calls."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_rel
from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.pipeline import guidance
from trellis2.trellis2_core.pipeline.guidance import run_sampler
from trellis2.trellis2_core.sampling import SamplerParams
from trellis2.trellis2_core.sparse import SparseTensor

TINY = {
    "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 48, "cond_channels": 16,
    "num_blocks": 2, "num_heads": 2, "mlp_ratio": 4.0, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "float32",
}  # fmt: skip
OFFICIAL = {  # SPEC 6: the three stages' sampler parameters
    "sparse_structure": SamplerParams(12, 7.5, 0.7, (0.6, 1.0), 5.0),
    "shape_slat": SamplerParams(12, 7.5, 0.5, (0.6, 1.0), 3.0),
    "tex_slat": SamplerParams(12, 1.0, 0.0, (0.6, 0.9), 3.0),
}


def _flow(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = from_config({"name": name, "args": TINY}, device="cpu").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


class _Recorder(torch.nn.Module):
    """Wraps a flow model: records (batch size, kwargs) of every call; optionally hides accepts_zero_cond_from."""

    def __init__(self, model, declare: bool):
        super().__init__()
        self.model, self.calls = model, []
        self.accepts_zero_cond_from = declare

    def forward(self, x, t, cond, **kwargs):
        batch = x.batch_size if isinstance(x, SparseTensor) else x.shape[0]
        self.calls.append((batch, dict(kwargs)))
        return self.model(x, t, cond, **kwargs)


@pytest.mark.parametrize("batched", [True, False])
def test_flows_skip_the_zero_condition_with_the_same_samples(batched):
    ss = _flow("SparseStructureFlowModel")
    noise, cond = torch.randn(1, 8, 4, 4, 4), torch.randn(1, 5, 16)
    params = OFFICIAL["sparse_structure"]
    fast, slow = _Recorder(ss, True), _Recorder(ss, False)
    a = run_sampler(fast, noise, cond, params, batched_cfg=batched)
    b = run_sampler(slow, noise, cond, params, batched_cfg=batched)
    assert_close_rel(a, b, rtol=1e-5, what="with vs without the zero-condition shortcut")
    negatives = [kw["zero_cond_from"] for _, kw in fast.calls if "zero_cond_from" in kw]
    assert negatives == ([1] * 10 if batched else [0] * 10)  # the 10 guided steps of the SS stage
    assert all(not kw for _, kw in slow.calls)


@pytest.mark.parametrize("stage", list(OFFICIAL))
@pytest.mark.parametrize("batched", [True, False])
def test_expected_calls_per_batch_size_match_the_sampler(stage, batched, monkeypatch):
    seen = {}

    class Spy(guidance.GraphedModel):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            seen["expected"] = kwargs["expected_calls"]

    monkeypatch.setattr(guidance, "GraphedModel", Spy)
    rec = _Recorder(lambda x, t, cond, **kw: 0.1 * x, False)
    run_sampler(rec, torch.randn(1, 8, 4, 4, 4), torch.randn(1, 5, 16), OFFICIAL[stage], batched_cfg=batched)
    counts: dict[int, int] = {}
    for batch, _ in rec.calls:
        counts[batch] = counts.get(batch, 0) + 1
    assert {b: n for b, n in seen["expected"].items() if n} == counts
    if stage == "sparse_structure" and batched:
        assert counts == {1: 2, 2: 10}  # the two unguided steps stay eager on CUDA (fewer than MIN_CALLS)
