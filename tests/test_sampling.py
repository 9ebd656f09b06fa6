"""Flow-matching Euler sampler with CFG, guidance interval and rescale (SPEC 11) against the reference's golden run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MANIFESTS
from trellis2.trellis2_core.errors import ConfigError, InputError, Interrupted
from trellis2.trellis2_core.sampling import SamplerParams, sample, time_grid
from trellis2.trellis2_core.sparse import SparseTensor

STAGES = ("sparse_structure", "shape_slat", "tex_slat")
CALLS = {"sparse_structure": 22, "shape_slat": 21, "tex_slat": 12}


def toy_model(calls: list | None = None):
    """The golden's velocity: tanh(x * cond + 0.001 * t) + 0.5 * cond, cond a per-item scalar; dense or sparse."""

    def fn(x, t, cond, **extra):
        if calls is not None:
            calls.append((x, t, cond, extra))
        if isinstance(x, SparseTensor):
            b = x.coords[:, 0].long()
            c, tt = cond[b].unsqueeze(1), t[b].unsqueeze(1)
            return x.replace(torch.tanh(x.feats * c + 0.001 * tt) + 0.5 * c)
        shape = (-1,) + (1,) * (x.dim() - 1)
        c, tt = cond.view(shape), t.view(shape)
        return torch.tanh(x * c + 0.001 * tt) + 0.5 * c

    return fn


@pytest.fixture(scope="module")
def gold():
    from conftest import Golden

    return Golden("sampler_flow_euler_guidance_interval")


def params_of(gold, stage: str) -> SamplerParams:
    return SamplerParams(**gold.config["params"][stage], sigma_min=gold.config["sigma_min"])


# ----------------------------------------------------------------------------------------------- time grid
@pytest.mark.parametrize("stage", STAGES)
def test_time_grid_is_bitwise_the_reference(gold, stage):
    p = params_of(gold, stage)
    ts = time_grid(p.steps, p.rescale_t)
    assert ts == gold.outputs[f"{stage}.t_seq"].tolist()  # exact float64 equality


def test_time_grid_shape_stage_hits_exactly_point_six():
    ts = time_grid(12, 3.0)
    assert ts[8] == 0.6 and ts[0] == 1.0 and ts[-1] == 0.0
    assert time_grid(10, 1.0)[7] == 0.29999999999999993  # numpy, not torch.linspace (0.30000000000000004)


# ----------------------------------------------------------------------------------------------- golden runs
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_dense_golden(gold, stage, batched):
    p, out = params_of(gold, stage), gold.outputs
    calls = []
    res = sample(
        toy_model(calls), gold.inputs["noise"], gold.inputs["cond"], gold.inputs["neg_cond"], p,
        batched_cfg=batched, return_trajectory=True,
    )
    assert res.t_seq == out[f"{stage}.t_seq"].tolist()
    torch.testing.assert_close(torch.stack(res.pred_x_t), out[f"{stage}.pred_x_t"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(res.pred_x_0), out[f"{stage}.pred_x_0"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.samples, out[f"{stage}.samples"], rtol=1e-5, atol=1e-6)
    guided = sum(p.guided(t) for t in res.t_seq[:-1])
    assert len(calls) == res.model_calls == (CALLS[stage] - guided if batched else CALLS[stage])
    assert all(c[1].dtype == torch.float32 and c[1].shape == (c[0].shape[0],) for c in calls)
    assert p.model_calls() == CALLS[stage]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_sparse_golden(gold, stage, batched):
    p, out = params_of(gold, stage), gold.outputs
    noise = SparseTensor(gold.inputs["sparse_noise_feats"], gold.inputs["sparse_coords"])
    noise.set_cache("marker", 1)
    calls = []
    res = sample(
        toy_model(calls), noise, gold.inputs["cond"], gold.inputs["neg_cond"], p,
        batched_cfg=batched, return_trajectory=True,
    )
    assert isinstance(res.samples, SparseTensor) and torch.equal(res.samples.coords, noise.coords)
    assert res.samples.get_cache("marker") == 1  # replace() keeps the coordinate cache (texturing path, SPEC 16)
    torch.testing.assert_close(torch.stack([x.feats for x in res.pred_x_t]), out[f"sparse.{stage}.pred_x_t"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.samples.feats, out[f"sparse.{stage}.samples"], rtol=1e-5, atol=1e-6)
    if batched and p.guidance_strength != 1:
        doubled = [c[0] for c in calls if c[0].batch_size == 4]
        assert doubled and all(d.coords is doubled[0].coords for d in doubled)  # one doubled layout, reused


def test_std_definition_matters(gold):
    # Without the rescale the SS stage lands elsewhere: the golden really checks the rescale path.
    p = params_of(gold, "sparse_structure")
    res = sample(toy_model(), gold.inputs["noise"], gold.inputs["cond"], gold.inputs["neg_cond"],
                 SamplerParams(**{**p.__dict__, "guidance_rescale": 0.0}))
    assert not torch.allclose(res.samples, gold.outputs["sparse_structure.samples"], rtol=1e-3)


def test_guidance_interval_boundary_is_float64_inclusive(gold):
    p = params_of(gold, "shape_slat")
    assert p.guided(0.6) and not p.guided(0.59999996)
    guided = [t for t in time_grid(12, 3.0)[:-1] if p.guided(t)]
    assert len(guided) == 9 and guided[-1] == 0.6


def test_strength_zero_uses_only_the_negative_condition():
    calls = []
    p = SamplerParams(steps=3, guidance_strength=0.0, guidance_rescale=0.7, guidance_interval=(0.0, 1.0))
    cond, neg = torch.tensor([0.8, -0.3]), torch.zeros(2)
    x = torch.randn(2, 4)
    res = sample(toy_model(calls), x, cond, neg, p)
    assert len(calls) == 3 and all(c[2] is neg for c in calls)
    ref = sample(toy_model(), x, neg, None, SamplerParams(steps=3))  # unguided run with the negative condition
    assert torch.equal(res.samples, ref.samples)


def test_extra_kwargs_reach_every_call_and_are_doubled_when_batched():
    calls = []
    x = torch.randn(2, 3)
    concat = torch.randn(2, 3)
    p = SamplerParams(steps=2, guidance_strength=3.0)
    sample(toy_model(calls), x, torch.ones(2), torch.zeros(2), p, extra_kwargs={"concat_cond": concat, "flag": 7})
    assert len(calls) == 4 and all(c[3]["concat_cond"] is concat and c[3]["flag"] == 7 for c in calls)
    calls.clear()
    sample(toy_model(calls), x, torch.ones(2), torch.zeros(2), p, extra_kwargs={"concat_cond": concat, "flag": 7}, batched_cfg=True)
    assert len(calls) == 2 and torch.equal(calls[0][3]["concat_cond"], torch.cat([concat, concat]))
    assert calls[0][2].tolist() == [1, 1, 0, 0] and calls[0][3]["flag"] == 7


@pytest.mark.parametrize("batched", [False, True])
def test_zero_neg_cond_tells_the_model_which_items_are_negative(batched):
    """zero_neg_cond=True: every evaluation of neg_cond carries zero_cond_from (the first negative item); the
    conditional ones carry nothing; results are unchanged for a model that ignores it."""
    calls = []
    x, cond, neg = torch.randn(2, 3), torch.tensor([0.8, -0.3]), torch.zeros(2)
    p = SamplerParams(steps=4, guidance_strength=3.0, guidance_interval=(0.5, 1.0))
    res = sample(toy_model(calls), x, cond, neg, p, batched_cfg=batched, zero_neg_cond=True)
    guided = sum(p.guided(t) for t in time_grid(4, 1.0)[:-1])
    for _, _, c, extra in calls:
        if c is neg:
            assert extra == {"zero_cond_from": 0}
        elif c.shape[0] == 4:  # the batched pair: items 2.. are the negative condition
            assert extra == {"zero_cond_from": 2} and torch.equal(c, torch.cat([cond, neg]))
        else:
            assert c is cond and extra == {}
    assert sum("zero_cond_from" in e for *_, e in calls) == guided
    assert torch.equal(res.samples, sample(toy_model(), x, cond, neg, p, batched_cfg=batched).samples)
    calls.clear()
    sample(toy_model(calls), x, cond, neg, SamplerParams(steps=2, guidance_strength=0.0), zero_neg_cond=True)
    assert [e for *_, e in calls] == [{"zero_cond_from": 0}] * 2  # the g = 0 branch evaluates neg_cond only


# ----------------------------------------------------------------------------------------------- callbacks
def test_progress_and_no_trajectory_by_default(gold):
    seen = []
    res = sample(toy_model(), gold.inputs["noise"], gold.inputs["cond"], gold.inputs["neg_cond"],
                 params_of(gold, "shape_slat"), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 12) for k in range(1, 13)]
    assert res.pred_x_t is None and res.pred_x_0 is None


@pytest.mark.parametrize("stop_after", [0, 5])
def test_should_stop_raises_before_any_further_model_call(gold, stop_after):
    calls, polls = [], []

    def should_stop():
        polls.append(len(calls))
        return len(polls) > stop_after

    with pytest.raises(Interrupted, match=f"before step {stop_after + 1}/12"):
        sample(toy_model(calls), gold.inputs["noise"], gold.inputs["cond"], gold.inputs["neg_cond"],
               params_of(gold, "shape_slat"), should_stop=should_stop)
    assert len(calls) == polls[-1]  # nothing was evaluated after the stop was seen
    assert len(calls) == sum(2 if t >= 0.6 else 1 for t in time_grid(12, 3.0)[:stop_after])


# ----------------------------------------------------------------------------------------------- params
def test_params_from_pipeline_json():
    pipe = json.loads((MANIFESTS / "pipeline.json").read_text())["args"]
    ss = SamplerParams.from_pipeline_entry(pipe["sparse_structure_sampler"])
    assert ss == SamplerParams(12, 7.5, 0.7, (0.6, 1.0), 5.0, 1e-5)
    tex = SamplerParams.from_pipeline_entry(pipe["tex_slat_sampler"], steps=20)
    assert tex.steps == 20 and tex.guidance_interval == (0.6, 0.9) and tex.model_calls() == 20
    shape = SamplerParams.from_pipeline_entry(pipe["shape_slat_sampler"])
    assert shape.model_calls() == 21


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"steps": 2.5}, "steps must be an int >= 1"),
        ({"steps": 4, "guidance_rescale": 1.5}, r"guidance_rescale must be in \[0, 1\]"),
        ({"steps": 4, "rescale_t": 0}, "rescale_t must be > 0"),
        ({"steps": 4, "guidance_interval": (0.9, 0.1)}, "lo <= hi"),
        ({"steps": 4, "guidance_interval": 0.5}, "two numbers"),
        ({"steps": 4, "guidance_strength": float("nan")}, "guidance_strength must be a finite number"),
        ({"steps": 4, "sigma_min": 1.0}, r"sigma_min must be in \[0, 1\)"),
    ],
)
def test_param_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplerParams(**kwargs)


def test_pipeline_entry_validation_messages():
    good = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5}, "params": {"steps": 3}}
    with pytest.raises(ConfigError, match="FlowEulerGuidanceIntervalSampler"):
        SamplerParams.from_pipeline_entry({**good, "name": "FlowEulerSampler"})
    with pytest.raises(ConfigError, match=r"unknown keys \['params.stpes'\]"):
        SamplerParams.from_pipeline_entry({**good, "params": {"steps": 3, "stpes": 4}})
    with pytest.raises(ConfigError, match="args.eta"):
        SamplerParams.from_pipeline_entry({**good, "args": {"eta": 1}})
    with pytest.raises(ConfigError, match="no params.steps"):
        SamplerParams.from_pipeline_entry({**good, "params": {}})


def test_sample_input_errors():
    p = SamplerParams(steps=2, guidance_strength=3.0)
    x = torch.randn(2, 3)
    with pytest.raises(InputError, match="neg_cond is None"):
        sample(toy_model(), x, torch.ones(2), None, p)
    with pytest.raises(InputError, match="batched_cfg needs cond and neg_cond"):
        sample(toy_model(), x, torch.ones(2), torch.zeros(3), p, batched_cfg=True)
    with pytest.raises(InputError, match="model_fn must return a velocity"):
        sample(lambda x, t, c: x[:1], x, torch.ones(2), torch.zeros(2), p)
    with pytest.raises(InputError, match="SamplerParams"):
        sample(toy_model(), x, torch.ones(2), torch.zeros(2), {"steps": 2})


@pytest.mark.cuda
@pytest.mark.parametrize("batched", [False, True])
def test_steps_make_no_host_sync_on_cuda(batched):
    """The sampler's own per-step work never blocks the host (a sync per step idles the GPU while kernels launch)."""
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.cat([torch.zeros(400, 1), torch.randint(0, 16, (400, 3), generator=g)], 1).int(), dim=0)
    x = SparseTensor(torch.randn(len(coords), 8, generator=g), coords).to("cuda")
    c = torch.randn(1, 4, 8, generator=g).cuda()
    params = SamplerParams(steps=4, guidance_strength=3.0, guidance_rescale=0.7)

    def model(x, t, cond):
        return x.replace(x.feats * 0.1 + cond.mean() + t.mean() * 1e-4)

    sample(model, x, c, torch.zeros_like(c), params, batched_cfg=batched)  # warms the per-coordinates caches
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(model, x, c, torch.zeros_like(c), params, batched_cfg=batched)
    finally:
        torch.cuda.set_sync_debug_mode(0)
