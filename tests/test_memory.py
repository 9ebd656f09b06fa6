"""Memory: the planner for the official sizes, budgets and the allocator, chunked decoding, Components with a plan
(block streaming: test_streaming.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MANIFESTS, TINY_DIT, Golden, assert_close_rel, random_model, tiny_slat_inputs
from trellis2.kernels.sparse_conv import reference as spconv
from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.models.decoder_chunking import chunk_decoder, decoder_chunk_rows
from trellis2.trellis2_core.models.sparse_unet_vae import SparseConvNeXtBlock3d, SparseResBlockC2S3d
from trellis2.trellis2_core.nn.streaming import streamer_of
from trellis2.trellis2_core.pipeline import Components, allocator, memory
from trellis2.trellis2_core.pipeline.memory import (
    DINOV3_VITL16_BYTES, GiB, IMAGE_COND, MemoryPlan, ModelSize, budget_bytes, decoder_activation_bytes,
    dit_activation_bytes, parse_vram_budget, plan_memory, sizes_from_manifests,
)  # fmt: skip
from trellis2.trellis2_core.sparse import SparseTensor

HOST = 128 * GiB
DIT_ROLE = "shape_slat_flow_model_512"


@pytest.fixture(autouse=True)
def fused_norms_on_cuda(monkeypatch):
    """Plans for "cuda" assume the decoders' fused LayerNorm (Triton) whether or not triton imports here, so the
    expectations below do not depend on this machine; ``test_plan_budgets_the_float32_copies_without_the_fused_norm``
    covers the other case."""
    monkeypatch.setattr(memory, "_fused_norms", lambda device: device.type == "cuda")


@pytest.fixture(scope="module")
def sizes():
    """Official sizes: every role of the official pipeline.json, from the manifests, plus DINOv3 ViT-L fp32."""
    models = json.loads((MANIFESTS / "pipeline.json").read_text())["args"]["models"]
    manifests = {role: json.loads((MANIFESTS / f"{path.split('/')[-1]}.json").read_text()) for role, path in models.items()}
    out = sizes_from_manifests(manifests)
    out[IMAGE_COND] = ModelSize(IMAGE_COND, "image_cond", DINOV3_VITL16_BYTES)
    return out


# ------------------------------------------------------------------------------------------------ planner
def test_sizes_match_the_manifests(sizes):
    man = json.loads((MANIFESTS / "slat_flow_img2shape_dit_1_3B_1024_bf16.json").read_text())
    dit = sizes["shape_slat_flow_model_1024"]
    assert dit.kind == "dit" and dit.weight_bytes == man["param_bytes_if_stored_as_module_dtype"]  # ~2.62 GB
    assert len(dit.block_bytes) == 30 and dit.channels == (1536, 8192)
    assert dit.streamed_bytes(1) < 0.3e9 < 2.5e9 < sum(dit.block_bytes)  # top level + 2 blocks of ~85 MB
    dec = sizes["shape_slat_decoder"]
    assert dec.kind == "sc_decoder" and 0.9e9 < dec.weight_bytes < 1.0e9 and dec.channels == (1024, 512, 256, 128, 64)
    assert sizes["sparse_structure_decoder"].kind == "ss_decoder"
    # Loading in float32 (CPU) doubles the half tensors.
    f32 = sizes_from_manifests({"x": man}, torch.float32)["x"]
    assert 1.9 * dit.weight_bytes < f32.weight_bytes < 2.01 * dit.weight_bytes


def test_activation_formulas(sizes):
    dit = sizes[DIT_ROLE]
    c, h = dit.channels
    assert dit_activation_bytes(1, dit) == 2 * (3 * c + 2 * h) + 8 * c  # ~54 kB per token
    dec = sizes["shape_slat_decoder"]
    assert dec.level_blocks == (4, 16, 8, 4, 0)  # the finest level has no ConvNeXt block
    for fused in (False, True):
        full = decoder_activation_bytes(24576, dec, fused_norms=fused)
        assert decoder_activation_bytes(24576, dec, 2**20, fused_norms=fused) < full  # chunks lower the peak
        assert decoder_activation_bytes(49152, dec, fused_norms=fused) > 1.9 * full  # linear in the tokens
    # the fused norm holds no float32 copy; a level without blocks costs no ConvNeXt peak
    assert decoder_activation_bytes(24576, dec, fused_norms=True) < decoder_activation_bytes(24576, dec)
    every_level = dataclasses.replace(dec, level_blocks=(1,) * 5)
    assert decoder_activation_bytes(24576, every_level, fused_norms=True) > decoder_activation_bytes(24576, dec, fused_norms=True)
    # H100 (bench/decoder_probe.py --memory, the fused path): measured peaks above the decode's start, GiB, for
    # (latent tokens, chunk rows); the estimate must cover each and stay within 25% of it.
    measured = {(14120, None): 2.94, (14120, 2**20): 2.60, (14120, 2**18): 2.22, (18776, None): 3.54,
                (18776, 2**20): 3.11, (18776, 2**18): 2.96, (40856, None): 7.59, (40856, 2**20): 6.34,
                (40856, 2**18): 6.34}  # fmt: skip
    for (tokens, rows), peak in measured.items():
        est = decoder_activation_bytes(tokens, dec, rows, fused_norms=True) / GiB
        assert peak <= est <= 1.25 * peak, (tokens, rows, peak, est)


@pytest.mark.parametrize(
    "pipeline_type, budget, policy, stream, batched, chunked, fits",
    [
        ("1024_cascade", 80, "keep", False, True, False, True),
        ("1024_cascade", 24, "keep", False, True, False, True),  # a 24 GB card keeps every model on the GPU
        ("1024_cascade", 12, "offload", False, True, False, True),  # the target (int32 neighbour maps: no chunking)
        ("1024_cascade", 8, "offload", False, True, False, True),  # the fused norms: no chunking needed either
        ("512", 80, "keep", False, True, False, True),
        ("512", 24, "keep", False, True, False, True),
        ("512", 12, "offload", False, True, False, True),
        ("512", 8, "offload", False, True, False, True),  # the target
    ],
)  # fmt: skip
def test_plan_for_official_sizes(sizes, pipeline_type, budget, policy, stream, batched, chunked, fits):
    p = plan_memory(sizes, "cuda", budget, pipeline_type=pipeline_type, host_ram_bytes=HOST)
    assert (p.policy, p.stream_blocks, p.batched_cfg, p.decoder_chunk_voxels is not None, p.fits) == (
        policy, stream, batched, chunked, fits), p.table()  # fmt: skip
    assert p.budget_bytes == budget * GiB and p.usable_bytes < p.budget_bytes
    assert (p.peak_bytes <= p.usable_bytes) == fits
    assert p.decoder_roles == ("shape_slat_decoder", "tex_slat_decoder")
    stages = {s.role for s in p.stages}
    assert IMAGE_COND in stages and ("shape_slat_flow_model_1024" in stages) == (pipeline_type != "512")


def test_plan_budgets_the_float32_copies_without_the_fused_norm(sizes, monkeypatch):
    """Without the fused kernel (no triton, or TRELLIS2_VAE_NORM_BACKEND=torch) the decoders' LayerNorms make float32
    copies: 1024_cascade at 8 GiB needs chunked decoding, with the kernel it does not."""
    monkeypatch.setattr(memory, "_fused_norms", lambda device: False)
    p8 = plan_memory(sizes, "cuda", 8, pipeline_type="1024_cascade", host_ram_bytes=HOST)
    assert p8.fits and p8.decoder_chunk_voxels is not None
    unfused = plan_memory(sizes, "cuda", None, pipeline_type="1024_cascade").stages[-1].activation_bytes
    monkeypatch.setattr(memory, "_fused_norms", lambda device: True)
    assert plan_memory(sizes, "cuda", 8, pipeline_type="1024_cascade", host_ram_bytes=HOST).decoder_chunk_voxels is None
    assert plan_memory(sizes, "cuda", None, pipeline_type="1024_cascade").stages[-1].activation_bytes < unfused
    # float32 decoders (dtype=torch.float32) stay on the reference LayerNorm: their copies are budgeted
    f32 = {r: dataclasses.replace(m, elem_bytes=4) for r, m in sizes.items()}
    whole = plan_memory(f32, "cuda", None, pipeline_type="1024_cascade").stages[-1]
    assert whole.activation_bytes == decoder_activation_bytes(24576, f32["tex_slat_decoder"], fused_norms=False)


def test_the_fused_norm_is_assumed_only_where_it_would_run(monkeypatch):
    monkeypatch.undo()  # the real decision, not the module's fixture
    from trellis2.kernels import vae_norm

    assert not memory._fused_norms(torch.device("cpu"))
    monkeypatch.setenv(vae_norm.ENV_VAR, "torch")
    assert not vae_norm.fused_available() and not memory._fused_norms(torch.device("cuda"))
    monkeypatch.delenv(vae_norm.ENV_VAR)
    assert not vae_norm.fused_available(torch.float32)  # float32 features stay on the reference
    monkeypatch.setattr(vae_norm, "_triton_module", lambda required: None)  # no triton here
    assert not vae_norm.fused_available()
    monkeypatch.setattr(vae_norm, "_triton_module", lambda required: object())
    assert vae_norm.fused_available() and memory._fused_norms(torch.device("cuda"))


def test_plan_streams_and_unbatches_when_the_dit_does_not_fit(sizes):
    # 65536 tokens: batched CFG needs ~7 GB of activations, one branch ~3.5 GB.
    p = plan_memory(sizes, "cuda", 8, pipeline_type="512", tokens=65536, host_ram_bytes=HOST)
    assert not p.batched_cfg and not p.stream_blocks
    p = plan_memory(sizes, "cuda", 5, pipeline_type="512", tokens=65536, host_ram_bytes=HOST)
    assert p.stream_blocks and not p.batched_cfg
    assert set(p.stream_roles) == {"sparse_structure_flow_model", "shape_slat_flow_model_512", "tex_slat_flow_model_512"}
    dit = [s for s in p.stages if s.role == DIT_ROLE][0]
    assert dit.weight_bytes == sizes[DIT_ROLE].streamed_bytes(1) and dit.total_bytes <= p.usable_bytes


def test_plan_frees_when_host_ram_is_small_and_none_is_unconstrained(sizes):
    assert plan_memory(sizes, "cuda", 12, host_ram_bytes=8 * GiB).policy == "free"
    p = plan_memory(sizes, "cuda", None)
    assert (p.policy, p.stream_blocks, p.decoder_chunk_voxels, p.budget_bytes) == ("keep", False, None, None)
    assert "| decode shape | shape_slat_decoder |" in p.table() and "budget none" in p.summary()


def test_budget_options(monkeypatch):
    assert parse_vram_budget(None) is None and parse_vram_budget("none") is None and parse_vram_budget(" ") is None
    assert parse_vram_budget("AUTO") == "auto" and parse_vram_budget("11.5 GB") == 11.5 and parse_vram_budget(8) == 8.0
    for bad in ("lots", -1, 0, "0", True, float("nan")):
        with pytest.raises(InputError, match="vram_budget"):
            parse_vram_budget(bad)
    with pytest.raises(InputError, match="pipeline_type"):
        plan_memory({}, "cuda", 8, pipeline_type="2048")
    with pytest.raises(InputError, match="tokens"):
        plan_memory({}, "cuda", 8, tokens=(0, 5))
    assert budget_bytes("auto", "cpu") is None and budget_bytes(2, "cpu") == 2 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 12 * GiB))
    assert budget_bytes("auto", "cuda:0") == 12 * GiB  # read at call time: the card's total


def test_a_budget_on_cuda_switches_the_allocator_to_expandable_segments_unless_configured(monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    for name in allocator.ALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not allocator.prefer_expandable_segments("cpu") and calls == []
    assert allocator.prefer_expandable_segments("cuda:0") and calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own choice stands
    assert not allocator.prefer_expandable_segments("cuda") and len(calls) == 1
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")  # ComfyUI's default backend
    assert not allocator.prefer_expandable_segments("cuda") and len(calls) == 1

    def refuse(_):
        raise RuntimeError("expandable_segments not supported on this platform")

    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse, raising=False)
    assert not allocator.prefer_expandable_segments("cuda")


@pytest.mark.cuda
def test_a_budget_gives_expandable_segments_on_the_gpu():
    """On a real GPU, in a fresh process (the setting is process-wide): memory reserved after the switch comes in
    expandable segments."""
    code = (
        "import torch\n"
        "from trellis2.trellis2_core.pipeline.allocator import prefer_expandable_segments\n"
        "switched = prefer_expandable_segments('cuda')\n"
        "x = torch.empty(256 << 20, dtype=torch.uint8, device='cuda')\n"
        "print(switched, any(s.get('is_expandable') for s in torch.cuda.memory._snapshot()['segments']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in allocator.ALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"], run.stdout + run.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ chunked decoding
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_sparse_conv_reference_chunks_compute_the_same(rows):
    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(12**3, generator=g)[:300]
    coords = torch.stack([torch.zeros_like(cells), cells // 144, cells // 12 % 12, cells % 12], 1).int()
    nbr = spconv.build_neighbours(coords)
    feats, w, b = torch.randn(300, 5, generator=g), torch.randn(6, 3, 3, 3, 5, generator=g), torch.randn(6, generator=g)
    whole = spconv.submanifold_conv3d(feats, nbr, w, b, chunk_rows=300)
    assert torch.allclose(spconv.submanifold_conv3d(feats, nbr, w, b, chunk_rows=rows), whole, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def decoders():
    g = Golden("scvae_decoders")

    def load(config, weights):
        model = from_config(config, device="meta")
        want = model.state_dict()
        model.load_state_dict({k: v.to(want[k].dtype) for k, v in weights.items()}, strict=True, assign=True)
        return model.eval()

    shape = load(g.config["shape_dec"], g.weights_with_prefix("shape_dec."))
    tex = load(g.config["tex_dec"], g.weights_with_prefix("tex_dec."))
    return shape, tex, SparseTensor(g.inputs["latent_feats"], g.inputs["latent_coords"])


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_chunked_decoders_compute_the_same(decoders, rows):
    shape, tex, latent = decoders
    with torch.no_grad():
        raw, subs = shape(latent, return_subs=True)
        col = tex(latent, guide_subs=subs)
        blocks = sum(isinstance(m, (SparseConvNeXtBlock3d, SparseResBlockC2S3d)) for m in shape.modules())
        assert any(isinstance(m, SparseResBlockC2S3d) for m in shape.modules())
        assert chunk_decoder(shape, rows) == blocks + 1 and chunk_decoder(tex, rows) > 0 and decoder_chunk_rows(shape) == rows
        assert "output_head" in shape.__dict__ and "output_head" in tex.__dict__  # the output heads run chunked too
        try:
            raw_c, subs_c = shape(latent, return_subs=True)
            col_c = tex(latent, guide_subs=subs_c)
        finally:
            chunk_decoder(shape, None), chunk_decoder(tex, None)
    assert decoder_chunk_rows(shape) is None
    assert torch.equal(raw_c.coords, raw.coords) and torch.equal(col_c.coords, col.coords)
    # Same operations per row; a GEMM over fewer rows may take another kernel (fp32 CPU: ~5e-7 relative).
    assert_close_rel(raw_c.feats, raw.feats, rtol=2e-6, what="shape decoder")
    assert_close_rel(col_c.feats, col.feats, rtol=2e-6, what="texture decoder")
    for a, b in zip(subs_c, subs):  # the subdivision decisions are the same
        assert torch.equal(a.feats > 0, b.feats > 0)
        assert_close_rel(a.feats, b.feats, rtol=2e-6, what="subdivision logits")
    with pytest.raises(ValueError, match="rows"):
        chunk_decoder(shape, 0)


# ------------------------------------------------------------------------------------------------ Components
def _plan(policy: str, **kw) -> MemoryPlan:
    base = dict(stream_blocks=True, decoder_chunk_voxels=4, batched_cfg=False, pipeline_type="512",
                stream_roles=(DIT_ROLE,), decoder_roles=("shape_slat_decoder",))  # fmt: skip
    return MemoryPlan(policy=policy, **{**base, **kw})


@pytest.mark.parametrize("policy", ["keep", "offload", "free"])
def test_components_follow_the_plan(decoders, policy):
    loads = []
    shape_dec = decoders[0]

    def dit_loader():
        loads.append(DIT_ROLE)
        return random_model("SLatFlowModel", TINY_DIT)

    comps = Components({DIT_ROLE: dit_loader, "shape_slat_decoder": lambda: shape_dec}, "cpu", policy=policy, plan=_plan(policy))
    assert comps.batched_cfg is False and Components({}, "cpu").batched_cfg is True
    x, t, cond = tiny_slat_inputs()
    ref = random_model("SLatFlowModel", TINY_DIT)(x, t, cond).feats
    for _ in range(2):
        with comps.use(DIT_ROLE) as m, torch.no_grad():
            assert streamer_of(m) is not None
            assert torch.equal(m(x, t, cond).feats, ref)
        held = comps._loaded.get(DIT_ROLE)
        assert (held is not None) == (policy != "free")
        assert (held is not None and streamer_of(held) is not None) == (policy == "keep")  # released: unstreamed
    assert loads == [DIT_ROLE] * (2 if policy == "free" else 1)
    with comps.use("shape_slat_decoder") as dec:
        assert decoder_chunk_rows(dec) == 4
    chunk_decoder(shape_dec, None)


def test_components_without_a_plan_do_nothing_new():
    m = random_model("SLatFlowModel", TINY_DIT)
    comps = Components({DIT_ROLE: lambda: m}, "cpu", policy="offload")
    with comps.use(DIT_ROLE) as used:
        assert used is m and streamer_of(m) is None


# ------------------------------------------------------------------------------------------------ components_for
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot
    from trellis2.trellis2_core.weights import resolve_pipeline

    return resolve_pipeline(write_tiny_snapshot(tmp_path_factory.mktemp("snapshot") / "tiny"), allow_download=False)


def test_components_for_plans_from_the_headers_and_generates_the_same(tiny):
    import numpy as np
    from PIL import Image

    from trellis2.trellis2_core.pipeline import Trellis2Pipeline
    from trellis2.trellis2_core.pipeline.memory import components_for, sizes_from_files

    sizes = sizes_from_files(tiny, torch.float32)
    assert sizes[DIT_ROLE].kind == "dit" and len(sizes[DIT_ROLE].block_bytes) == 2 and IMAGE_COND in sizes
    free = components_for(tiny, "cpu", torch.float32, None)
    assert free.plan is None and free.policy == "keep"
    assert components_for(tiny, "cpu", torch.float32, "auto").plan is None  # auto off CUDA: no budget
    # A budget below the tiny models' activations forces every measure: streaming, one CFG branch, chunking.
    tight = components_for(tiny, "cpu", torch.float32, 1e-5, pipeline_type="512", tokens=4096)
    plan = tight.plan
    assert plan.stream_blocks and not plan.batched_cfg and plan.decoder_chunk_voxels and not plan.fits
    assert tight.policy in ("offload", "free") and DIT_ROLE in plan.stream_roles
    with pytest.raises(InputError, match="policy"):
        components_for(tiny, "cpu", torch.float32, 8, policy="sometimes")

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 12:50] = (200, 60, 30, 255)
    image = Image.fromarray(rgba, "RGBA")
    fast = {s: {"steps": 2} for s in ("sparse_structure", "shape_slat", "tex_slat")}
    outs = [Trellis2Pipeline(tiny, c).generate(image, seed=1, pipeline_type="512", sampler_overrides=fast)
            for c in (free, tight)]  # fmt: skip
    a, b = (o.ovoxel for o in outs)
    assert torch.equal(a.coords, b.coords)
    assert_close_rel(b.attributes, a.attributes, rtol=2e-6, what="PBR attributes")


@pytest.mark.cuda
def test_offload_on_cuda_keeps_a_pinned_copy_and_gives_the_same_result():
    from trellis2.trellis2_core.pipeline.components import Components

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
    comps = Components({"m": lambda: net}, "cuda", policy="offload")
    x = torch.randn(8, 16, device="cuda")
    with comps.use("m") as m:
        first = m(x)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in net.parameters())
    with comps.use("m") as m:
        assert all(p.device.type == "cuda" for p in m.parameters())
        assert torch.equal(m(x), first)


def test_offload_of_a_component_that_is_not_a_module_uses_its_own_to():
    """The DINOv3 conditioner wraps a module; offloading it must not assume nn.Module (CLI default policy)."""
    from trellis2.trellis2_core.pipeline.components import Components

    class Wrapper:  # like DinoV3Conditioner: has .to, is not an nn.Module
        def __init__(self):
            self.moves = []

        def to(self, device=None, dtype=None):
            self.moves.append(torch.device(device))
            return self

    w = Wrapper()
    comps = Components({"image_cond_model": lambda: w}, "cuda", policy="offload")  # no CUDA needed: nothing runs on it
    with comps.use("image_cond_model") as got:
        assert got is w
    assert w.moves == [torch.device("cpu")]


def test_plan_allows_cuda_graphs_only_with_room_for_them(sizes):
    from trellis2.trellis2_core.pipeline.components import cuda_graphs
    from trellis2.trellis2_core.pipeline.memory import GRAPH_HEADROOM

    for ptype in ("512", "1024_cascade"):  # official token counts: the DiT activations are small next to the weights
        for budget in (None, 80, 12, 8):
            assert plan_memory(sizes, "cuda", budget, pipeline_type=ptype, host_ram_bytes=HOST).cuda_graphs
    # 65536 tokens under 8 GiB: one branch fits eagerly, but not with the graphs' extra half
    p = plan_memory(sizes, "cuda", 8, pipeline_type="512", tokens=65536, host_ram_bytes=HOST)
    dit = max((s for s in p.stages if sizes[s.role].kind == "dit"), key=lambda s: s.activation_bytes)
    assert not p.stream_blocks and dit.total_bytes <= p.usable_bytes  # (the decoders are what does not fit here)
    assert dit.weight_bytes + GRAPH_HEADROOM * dit.activation_bytes > p.usable_bytes and not p.cuda_graphs
    assert "cuda_graphs False" in p.summary()
    streamed = plan_memory(sizes, "cuda", 5, pipeline_type="512", tokens=65536, host_ram_bytes=HOST)
    assert streamed.stream_blocks and not streamed.cuda_graphs
    assert Components({}, "cpu", plan=p).cuda_graphs is False and cuda_graphs(Components({}, "cpu")) is True
    assert cuda_graphs(object()) is True  # a component source without a plan (e.g. a user's own)


def test_plan_keeps_the_structure_graphs_only_when_models_stay_and_there_is_room(sizes):
    from trellis2.trellis2_core.pipeline.components import keep_graphs
    from trellis2.trellis2_core.pipeline.memory import GRAPH_HEADROOM

    assert plan_memory(sizes, "cuda", None, pipeline_type="512").keep_graphs
    roomy = plan_memory(sizes, "cuda", 80, pipeline_type="1024_cascade", host_ram_bytes=HOST)
    assert roomy.policy == "keep" and roomy.keep_graphs and "keep_graphs True" in roomy.summary()
    assert keep_graphs(Components({}, "cpu", plan=roomy)) and keep_graphs(Components({}, "cpu"))
    tight = plan_memory(sizes, "cuda", 8, pipeline_type="1024_cascade", host_ram_bytes=HOST)
    assert tight.policy != "keep" and tight.cuda_graphs and not tight.keep_graphs  # models leave; graphs with them
    assert not keep_graphs(Components({}, "cpu", plan=tight))
    # Scanning budgets upwards: once every model stays, graphs come first, then room to keep the structure's too.
    states, kept_bytes = [], None
    for tenth in range(40, 800):
        p = plan_memory(sizes, "cuda", tenth / 10, pipeline_type="512", host_ram_bytes=HOST)
        if p.policy != "keep":
            continue
        ss = next(s for s in p.stages if s.role == "sparse_structure_flow_model")
        kept_bytes = GRAPH_HEADROOM * ss.activation_bytes
        later = p.stages[p.stages.index(ss) + 1 :]
        if p.keep_graphs:  # every later stage fits with the kept graphs beside it
            assert all(s.total_bytes + kept_bytes <= p.usable_bytes for s in later)
        states.append((p.cuda_graphs, p.keep_graphs))
    assert states[-1] == (True, True) and (True, False) in states and kept_bytes > 0
    assert states == sorted(states)  # monotone in the budget
