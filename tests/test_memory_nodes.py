"""The loader's ``vram_budget`` under ComfyUI 0.3.75's model management, on the CPU (see test_nodes_unit.py).

The outer test re-runs this file under the ComfyUI install's interpreter with ``TRELLIS2_NODES_INNER=1``.
"""

from __future__ import annotations

import os
import sys

import pytest

INNER = os.environ.get("TRELLIS2_NODES_INNER") == "1"

if not INNER:

    @pytest.mark.slow
    def test_memory_node_suite_inside_comfyui_python():
        from comfy_inner import run_inner_suite

        run_inner_suite(__file__, timeout=600, allow_skips=True)

else:
    sys.path.insert(0, os.environ["TRELLIS2_COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it: this suite runs on the CPU
    import comfy.model_management as mm
    import torch
    from comfy_inner import rgba_image, tiny_models_folder

    from trellis2.nodes import generation
    from trellis2.trellis2_core.errors import InputError
    from trellis2.trellis2_core.models.decoder_chunking import decoder_chunk_rows
    from trellis2.trellis2_core.nn.streaming import streamer_of

    DIT = "shape_slat_flow_model_512"

    @pytest.fixture(scope="module", autouse=True)
    def models_root(tmp_path_factory):
        return tiny_models_folder(tmp_path_factory.mktemp("trellis2_models"))

    def _loaded(patcher) -> bool:
        return any(lm.model is patcher for lm in mm.current_loaded_models)

    def test_budget_input_parses_and_auto_on_cpu_makes_no_plan():
        schema = {i.id: i for i in generation.Trellis2LoadModel.GET_SCHEMA().inputs}
        assert schema["vram_budget"].default == "auto"
        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False).result[0]  # default: auto
        assert pipe.components.plan is None and pipe.components.batched_cfg
        with pytest.raises(InputError, match="vram_budget"):
            generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False, "lots")

    def test_comfy_unloading_a_model_releases_its_kept_cuda_graphs():
        from trellis2.trellis2_core.nn import kept_graphs

        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False).result[0]
        comps = pipe.components
        assert comps.keep_graphs  # no plan (CPU): the structure stage may keep its graphs
        patcher = comps.patcher("sparse_structure_flow_model")
        module = patcher.model.module
        for unload in (lambda: patcher.detach(), lambda: patcher.partially_unload(patcher.offload_device, 1)):
            kept_graphs._KEPT[module] = kept_graphs.Kept((), None, {("key",): None})  # as a finished loop leaves them
            assert kept_graphs.kept_graphs(module) == 1
            unload()  # ComfyUI moving the weights: the graphs that read them go first
            assert kept_graphs.kept_graphs(module) == 0

    def test_tight_budget_streams_dits_chunks_decoders_and_offloads_after_each_stage():
        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False, "0.00001").result[0]
        comps = pipe.components
        plan = comps.plan
        assert plan is not None and plan.stream_blocks and DIT in plan.stream_roles and not comps.batched_cfg
        with comps.use(DIT) as dit:
            assert streamer_of(dit) is not None and not _loaded(comps.patcher(DIT))  # streamed, never loaded whole
        assert streamer_of(dit) is None and all(p.device.type == "cpu" for p in dit.parameters())
        with comps.use("shape_slat_decoder") as dec:
            patcher = comps.patcher("shape_slat_decoder")
            assert _loaded(patcher) and decoder_chunk_rows(dec) == plan.decoder_chunk_voxels
        assert not _loaded(patcher)  # offloaded as soon as the stage ended

    def test_budgeted_handle_generates_what_the_unbudgeted_one_does():
        image, mask = rgba_image()
        fast = dict(steps=2, guidance_strength=7.5, guidance_rescale=0.5, guidance_interval_start=0.6,
                    guidance_interval_end=1.0, rescale_t=3.0)  # fmt: skip
        results = []
        for budget in ("none", "0.00001"):
            model = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False, budget).result[0]
            cond, _ = generation.Trellis2Conditioning.execute(model, image, "1 = background (LoadImage MASK)", "512", mask=mask).result
            (structure,) = generation.Trellis2SparseStructure.execute(model, cond, "512", 7, **fast).result
            shape, geometry = generation.Trellis2Geometry.execute(model, cond, structure, "512", seed=-1, max_tokens=49152, **fast).result
            results.append((structure, shape))
        (s0, l0), (s1, l1) = results
        assert torch.equal(s0.coords, s1.coords) and torch.equal(l0.latent.coords, l1.latent.coords)
        # Streaming is exact, but a tight budget also runs the guided steps' two branches one after the other
        # instead of as one batch of two, which changes float rounding (not the maths): equal to fp32 precision.
        a, b = l0.latent.feats, l1.latent.feats
        assert (a - b).norm() / a.norm() < 1e-5  # measured 4e-7
