"""The nodes on an NVIDIA GPU inside ComfyUI 0.3.75's own Python code (its model management), without a server.

What the CPU suite (test_nodes_unit.py) cannot show: the sampling loops' CUDA graphs, the structure stage's graphs
kept between generations, the FP8 option's GEMMs, and ComfyUI moving or dropping the weights under them. Same
pattern as the CPU suite: the outer test re-runs this file under ComfyUI's interpreter with
``TRELLIS2_NODES_INNER=1`` (GPU visible), the inner half imports comfy and calls the nodes' ``execute``.
"""

from __future__ import annotations

import os
import sys

import pytest

INNER = os.environ.get("TRELLIS2_NODES_INNER") == "1"

if not INNER:

    @pytest.mark.cuda
    @pytest.mark.slow
    def test_node_suite_on_the_gpu_inside_comfyui_python():
        from comfy_inner import run_inner_suite

        run_inner_suite(__file__, timeout=1200, gpu=True)

else:
    sys.path.insert(0, os.environ["TRELLIS2_COMFYUI_DIR"])
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)", allow_module_level=True)

    import comfy.model_management as mm
    from comfy_inner import rgba_image, tiny_models_folder

    from trellis2.nodes import generation
    from trellis2.trellis2_core.nn import cuda_graphs
    from trellis2.trellis2_core.nn.fp8 import is_quantized
    from trellis2.trellis2_core.nn.kept_graphs import kept_graphs
    from trellis2.trellis2_core.pipeline import guidance

    SS_FLOW = "sparse_structure_flow_model"
    FAST = {stage: dict(steps=4, guidance_strength=g, guidance_rescale=r, guidance_interval_start=lo,
                        guidance_interval_end=hi, rescale_t=t)  # the official values, 4 steps (guided and not)
            for stage, (g, r, lo, hi, t) in {"ss": (7.5, 0.7, 0.6, 1.0, 5.0), "shape": (7.5, 0.5, 0.6, 1.0, 3.0),
                                             "tex": (1.0, 0.0, 0.6, 0.9, 3.0)}.items()}  # fmt: skip

    @pytest.fixture(scope="session", autouse=True)
    def models_root(tmp_path_factory):
        return tiny_models_folder(tmp_path_factory.mktemp("trellis2_models"))

    @pytest.fixture
    def loops(monkeypatch):
        """Every sampling loop's (captures, replays), recorded as its GraphedModel context closes."""
        seen = []

        class Recording(cuda_graphs.GraphedModel):
            def __exit__(self, *exc):
                seen.append((self.captures, self.replays))
                return super().__exit__(*exc)

        monkeypatch.setattr(guidance, "GraphedModel", Recording)
        return seen

    def _generate(model, seed: int = 7) -> dict:
        image, mask = rgba_image()
        cond, _ = generation.Trellis2Conditioning.execute(model, image, "1 = background (LoadImage MASK)", "512", mask=mask).result
        (structure,) = generation.Trellis2SparseStructure.execute(model, cond, "512", seed, **FAST["ss"]).result
        shape, geometry = generation.Trellis2Geometry.execute(model, cond, structure, "512", seed=-1, max_tokens=49152, **FAST["shape"]).result
        material, ovoxel = generation.Trellis2Material.execute(model, cond, shape, geometry, seed=-1, **FAST["tex"]).result
        torch.cuda.synchronize()
        return dict(coords=structure.coords.cpu(), shape=shape.latent.feats.cpu(), material=material.latent.feats.cpu(),
                    attributes=ovoxel.attributes.cpu())  # fmt: skip

    def _equal(a: dict, b: dict) -> None:
        for key in a:
            assert torch.equal(a[key], b[key]), key

    def _load(fp8: bool = False):
        return generation.Trellis2LoadModel.execute("tiny", "bf16", "auto", False, "auto", fp8).result[0]

    def test_graphs_replay_keep_the_structure_stage_and_change_no_result(loops, monkeypatch):
        model = _load()
        first = _generate(model)
        assert all(t.device.type == "cpu" for t in first.values())
        captured = sum(c for c, _ in loops)
        assert captured > 0 and sum(r for _, r in loops) > captured, loops  # the tiny flows are host-bound: graphed
        with model.components.use(SS_FLOW) as ss:
            assert kept_graphs(ss) > 0  # the structure stage left its graphs for the next generation
        loops.clear()
        second = _generate(model)
        _equal(first, second)
        assert loops[0][0] == 0 and loops[0][1] == FAST["ss"]["steps"], loops  # adopted: every SS step replays
        monkeypatch.setenv("TRELLIS2_CUDA_GRAPHS", "0")
        loops.clear()
        eager = _generate(model)
        assert sum(c + r for c, r in loops) == 0, loops
        _equal(first, eager)  # replays are the eager computation bit for bit

    def test_comfyui_unloading_drops_kept_graphs_and_the_next_run_is_the_same(loops):
        model = _load()
        first = _generate(model)
        comps = model.components
        with comps.use(SS_FLOW) as ss:
            patcher = comps.patcher(SS_FLOW)
            assert kept_graphs(ss) > 0
        patcher.partially_unload(torch.device("cpu"), memory_to_free=1 << 40)  # ComfyUI's lowvram path
        assert kept_graphs(patcher.model.module) == 0
        _equal(first, _generate(model))
        mm.unload_all_models()  # another workflow needs the memory: ComfyUI drops everything
        mm.soft_empty_cache()
        assert kept_graphs(patcher.model.module) == 0
        loops.clear()
        _equal(first, _generate(model))
        assert loops[0][0] > 0, loops  # weights were moved: captured afresh, not replayed stale

    def test_fp8_option_runs_fp8_gemms_on_the_gpu_deterministically(loops, monkeypatch):
        from trellis2.kernels.fp8 import fp8_matmul_supported

        model = _load(fp8=True)
        with model.components.use("shape_slat_flow_model_512") as flow:
            assert is_quantized(flow) and flow.blocks[0].mlp.mlp[0].weight.device.type == "cuda"
        first = _generate(model)
        assert all(bool(torch.isfinite(t.float()).all()) for t in first.values())
        _equal(first, _generate(model))
        if fp8_matmul_supported(torch.device("cuda")):  # sm_89+: torch._scaled_mm, not a dequantising fallback
            calls, real = [], torch._scaled_mm
            with monkeypatch.context() as m:
                m.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
                counted = _generate(model)
            assert calls, "no FP8 GEMM ran"
            _equal(first, counted)
        bf16 = _generate(_load(fp8=False))
        assert not all(torch.equal(first[k], bf16[k]) for k in ("shape", "material"))  # the option took effect

    def test_tight_budget_streams_the_flows_on_the_gpu_and_generates_what_the_unbudgeted_handle_does():
        """The memory plan's GPU path inside ComfyUI: DiT blocks streamed from CPU memory, decoders chunked, each
        model offloaded after its stage. fp32 (so that running the guided pair's branches one after the other, as
        a tight budget does, changes only float rounding); with fp8 weights the streamed run is deterministic."""
        from trellis2.trellis2_core.nn.streaming import streamer_of

        runs = {}
        for budget in ("none", "0.00001"):
            model = generation.Trellis2LoadModel.execute("tiny", "fp32", "auto", False, budget).result[0]
            assert (model.components.plan is not None and model.components.plan.stream_blocks) == (budget != "none")
            runs[budget] = _generate(model)
        a, b = runs["none"], runs["0.00001"]
        assert torch.equal(a["coords"], b["coords"])
        for key in ("shape", "material", "attributes"):
            err = ((a[key] - b[key]).norm() / a[key].norm()).item()
            assert err < 1e-4, (key, err)
        streamed = generation.Trellis2LoadModel.execute("tiny", "bf16", "auto", False, "0.00001", True).result[0]
        first = _generate(streamed)
        _equal(first, _generate(streamed))
        with streamed.components.use("shape_slat_flow_model_512") as flow:
            assert is_quantized(flow) and streamer_of(flow) is not None
        assert all(p.device.type == "cpu" for p in flow.parameters())  # back in CPU memory after the stage
