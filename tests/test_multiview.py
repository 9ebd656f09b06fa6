"""Multi-view conditioning: each mode's semantics on a toy velocity model, and the tiny pipeline with 1, 2, 4 views.

The toy model's velocity depends on the condition only through its mean token, so the modes have closed forms.
On the tiny snapshot the stages run 2 sampler steps on a forced structure (random weights give arbitrary ones).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_rel
from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.pipeline import Conditioning, Structure, Trellis2Pipeline, rng
from trellis2.trellis2_core.pipeline.guidance import run_sampler
from trellis2.trellis2_core.pipeline.multiview import MULTIVIEW_MODES
from trellis2.trellis2_core.sampling import SamplerParams, time_grid
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

FAST = {stage: {"steps": 2} for stage in ("sparse_structure", "shape_slat", "tex_slat")}


class Toy(torch.nn.Module):
    """v = 0.1 x + mean(cond[b]) per batch item; records the condition of every call."""

    def __init__(self):
        super().__init__()
        self.conds: list[torch.Tensor] = []

    def forward(self, x, t, cond):
        self.conds.append(cond)
        return 0.1 * x + cond.mean(dim=(1, 2)).view(-1, *([1] * (x.dim() - 1)))


def _views(v: int, length: int = 5, channels: int = 4) -> torch.Tensor:
    return torch.randn(v, length, channels, generator=torch.Generator().manual_seed(v))


UNGUIDED = SamplerParams(steps=4)
GUIDED = SamplerParams(steps=4, guidance_strength=3.0, guidance_interval=(0.0, 1.0))


def test_concat_gives_one_context_of_all_tokens_per_call():
    toy, views, x = Toy(), _views(3), torch.zeros(1, 2, 2)
    out = run_sampler(toy, x, views, GUIDED, multiview_mode="concat")
    assert len(toy.conds) == 4  # cond and uncond batched: one call per step, as for one view
    assert all(c.shape == (2, 15, 4) for c in toy.conds)
    assert torch.equal(toy.conds[0][0], views.reshape(15, 4)) and not toy.conds[0][1].any()
    # the toy only sees the mean token, which concatenation keeps: same as one view holding the mean of all
    one = run_sampler(Toy(), x, views.mean(0, keepdim=True), GUIDED)
    torch.testing.assert_close(out, one)


def test_average_calls_the_model_once_per_view_and_the_negative_once():
    toy, views, x = Toy(), _views(3), torch.zeros(1, 2, 2)
    out = run_sampler(toy, x, views, GUIDED, multiview_mode="average")
    assert len(toy.conds) == 4 * (3 + 1)
    assert all(c.shape == (1, 5, 4) for c in toy.conds)
    assert sum(not c.any() for c in toy.conds) == 4  # the zero negative: once per guided step
    torch.testing.assert_close(out, run_sampler(Toy(), x, views.mean(0, keepdim=True), GUIDED))
    calls = Toy()
    run_sampler(calls, x, views, UNGUIDED, multiview_mode="average")
    assert len(calls.conds) == 4 * 3


def test_alternate_conditions_step_k_on_view_k_mod_v():
    toy, views, x = Toy(), _views(3), torch.zeros(1, 2, 2)
    seen = []
    out = run_sampler(toy, x, views, SamplerParams(steps=5), multiview_mode="alternate", progress=lambda d, n: seen.append(d))
    assert seen == [1, 2, 3, 4, 5]  # the caller's progress still arrives
    assert len(toy.conds) == 5
    for k, c in enumerate(toy.conds):
        assert torch.equal(c[0], views[k % 3])
    # by hand: Euler with the view of each step
    t = time_grid(5, 1.0)
    ref = x.clone()
    for k in range(5):
        ref = ref - (t[k] - t[k + 1]) * (0.1 * ref + views[k % 3].mean())
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("mode", MULTIVIEW_MODES)
def test_one_view_is_the_single_view_path_in_every_mode(mode):
    a, b = Toy(), Toy()
    views, x = _views(1), torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(0))
    out = run_sampler(a, x, views, GUIDED, multiview_mode=mode)
    assert torch.equal(out, run_sampler(b, x, views, GUIDED))
    assert len(a.conds) == len(b.conds) and all(c.dim() == 3 for c in a.conds)


def test_bad_mode_and_bad_conditioning_raise():
    with pytest.raises(InputError, match="multiview_mode must be one of"):
        run_sampler(Toy(), torch.zeros(1, 2), _views(2), UNGUIDED, multiview_mode="mean")
    with pytest.raises(InputError, match=r"\[V, L, C\]"):
        run_sampler(Toy(), torch.zeros(1, 2), torch.zeros(5, 4), UNGUIDED)
    with pytest.raises(InputError, match="multiview_mode must be one of"):
        Conditioning(tokens={512: _views(2)}, multiview_mode="blend")
    with pytest.raises(InputError, match="one V for all"):
        Conditioning(tokens={512: _views(2), 1024: _views(3)})
    for bad in ({512: torch.tensor(1.0)}, {512: "tokens"}, {}, None):  # InputError, not IndexError/AttributeError
        with pytest.raises(InputError, match="one V for all"):
            Conditioning(tokens=bad)


# ----------------------------------------------------------------------------------------------- tiny pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = write_tiny_snapshot(tmp_path_factory.mktemp("snapshot") / "tiny")
    return Trellis2Pipeline.from_pretrained(root, device="cpu", allow_download=False)


def _image(k: int) -> Image.Image:
    rgba = np.zeros((96, 80, 4), np.uint8)
    rgba[20 + 3 * k:70, 15:60 - 5 * k] = (200 - 40 * k, 60 + 40 * k, 30, 255)
    rgba[30:40, 20 + 4 * k:50, :3] = (20, 180, 90)
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def images():
    return [_image(k) for k in range(4)]


@pytest.fixture(scope="module")
def cond4(pipe, images):
    return pipe.condition(images, (512,))


def ball(resolution: int, radius: float) -> Structure:
    r = torch.arange(resolution, dtype=torch.float32) + 0.5 - resolution / 2
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    return Structure(coords=torch.argwhere(((x**2 + y**2 + z**2) <= radius**2)[None]).int(), resolution=resolution)


def _stages(pipe, cond, seed=3):
    """Shape and material latents of the '512' pipeline on a forced ball, as one generate() would draw them."""
    g = rng.generator(seed)
    pipe._skip_structure_noise(g)
    shape = pipe.shape(cond, ball(32, 2.0), pipeline_type="512", generator=g, params=pipe.sampler_params("shape_slat", steps=2))
    material = pipe.material(cond, shape, generator=g, params=pipe.sampler_params("tex_slat", steps=2))
    return shape, material


def _subset(cond: Conditioning, v: int, mode: str) -> Conditioning:
    return Conditioning(tokens={r: t[:v] for r, t in cond.tokens.items()}, multiview_mode=mode)


@pytest.fixture(scope="module")
def single(pipe, cond4):
    """Latents of view 0 alone through the plain single-view path."""
    return _stages(pipe, Conditioning(tokens={512: cond4.at(512)[:1]}))


def test_condition_stacks_views(pipe, images, cond4):
    one = pipe.condition(images[2], (512,))
    assert cond4.num_views == 4 and cond4.at(512).shape[1:] == one.at(512).shape[1:]
    assert torch.equal(cond4.at(512)[2:3], one.at(512))  # each view encoded exactly as alone
    assert pipe.condition(images[:2], (512,), multiview_mode="alternate").multiview_mode == "alternate"


@pytest.mark.parametrize("mode", MULTIVIEW_MODES)
def test_pipeline_runs_with_1_2_4_views_deterministically(pipe, cond4, single, mode):
    for v in (1, 2, 4):
        shape, material = _stages(pipe, _subset(cond4, v, mode))
        same = torch.equal(shape.latent.feats, single[0].latent.feats) and torch.equal(material.latent.feats, single[1].latent.feats)
        assert same == (v == 1)  # one view: exactly the single-view path (a second run); more views change it
        assert torch.isfinite(material.latent.feats).all() and material.latent.feats.shape[1] == 32
        if v > 1:
            again = _stages(pipe, _subset(cond4, v, mode))
            assert torch.equal(shape.latent.feats, again[0].latent.feats)
            assert torch.equal(material.latent.feats, again[1].latent.feats)


@pytest.mark.parametrize("mode", MULTIVIEW_MODES)
def test_repeating_one_view_reproduces_the_single_view(pipe, cond4, single, mode):
    """Two copies of one view carry no new information: each mode must give back the one-view result
    (alternate exactly; concat and average up to rounding: softmax sums / unbatched guidance differ)."""
    one = cond4.at(512)[:1]
    twin = _stages(pipe, Conditioning(tokens={512: torch.cat([one, one])}, multiview_mode=mode))
    for a, b in zip(single, twin):
        if mode == "alternate":
            assert torch.equal(a.latent.feats, b.latent.feats)
        else:
            assert_close_rel(b.latent.feats, a.latent.feats, rtol=1e-4, what=f"{mode} twin views")


def test_structure_flow_takes_views(pipe, cond4):
    """The dense sparse-structure flow (stage 1) in every mode; on the flow directly (one guided step), since
    random tiny weights may decode an empty structure."""
    params = pipe.sampler_params("sparse_structure", steps=1)
    views = cond4.at(512)[:2]
    with pipe.components.use("sparse_structure_flow_model") as flow:
        noise = torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        single = run_sampler(flow, noise, views[:1], params)
        for mode in MULTIVIEW_MODES:
            a = run_sampler(flow, noise, views, params, multiview_mode=mode)
            assert a.shape == noise.shape and torch.isfinite(a).all()
            assert (mode == "alternate") == torch.equal(a, single)  # one step: alternate uses view 0 only


def test_generate_accepts_a_list_of_views(pipe, images):
    s = ball(32, 2.0)
    a = pipe.generate(images[:2], seed=3, pipeline_type="512", structure=s, sampler_overrides=FAST, multiview_mode="average")
    assert a.conditioning.num_views == 2 and a.conditioning.multiview_mode == "average"
    b = pipe.generate(images[:1], seed=3, pipeline_type="512", structure=s, sampler_overrides=FAST)
    c = pipe.generate(images[0], seed=3, pipeline_type="512", structure=s, sampler_overrides=FAST)
    assert torch.equal(b.material.latent.feats, c.material.latent.feats)
    assert not torch.equal(a.material.latent.feats, c.material.latent.feats)
