"""The nodes layer against ComfyUI 0.3.75's own Python code, on the CPU, without starting a server.

The nodes import ``comfy``/``comfy_api``/``folder_paths``, whose dependencies live in the ComfyUI install's venv
(tests/comfy_harness.py installs it). So the outer test re-runs this file under that interpreter with
``TRELLIS2_NODES_INNER=1``; the inner run puts ComfyUI's folder on sys.path and runs the real tests below, which
call the node classes' ``execute`` directly with the tiny random snapshot (official file layout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

INNER = os.environ.get("TRELLIS2_NODES_INNER") == "1"

if not INNER:

    @pytest.mark.slow
    def test_node_unit_suite_inside_comfyui_python():
        from comfy_inner import run_inner_suite

        run_inner_suite(__file__, timeout=1200)

else:
    sys.path.insert(0, os.environ["TRELLIS2_COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it: this suite runs on the CPU
    import asyncio

    import numpy as np
    import torch
    import trimesh

    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    from comfy_api.latest import Types
    from comfy_inner import rgba_image, tiny_models_folder

    from trellis2.nodes import comfy_entrypoint, export, generation, mesh_nodes, mesh_socket
    from trellis2.nodes import model_management as mgmt
    from trellis2.trellis2_core.errors import CheckpointError, InputError
    from trellis2.trellis2_core.mesh.mesh import Mesh, PBRMaps
    from trellis2.trellis2_core.ovoxel.ovoxel import OVoxel
    from trellis2.trellis2_core.pipeline import rng

    def _nodes() -> list:
        ext = asyncio.run(comfy_entrypoint())
        return asyncio.run(ext.get_node_list())

    @pytest.fixture(scope="session")
    def models_root(tmp_path_factory):
        """models/trellis2 with the tiny snapshot as 'tiny' and a broken folder as 'incomplete'."""
        root = tiny_models_folder(tmp_path_factory.mktemp("trellis2_models"))
        (root / "incomplete").mkdir()
        (root / "incomplete" / "pipeline.json").write_text((root / "tiny" / "pipeline.json").read_text())
        (root / "not_a_pipeline").mkdir()
        return root

    @pytest.fixture(scope="session")
    def model(models_root):
        return generation.Trellis2LoadModel.execute("tiny", "auto", "auto", False).result[0]

    @pytest.fixture
    def out_dirs(tmp_path):
        old = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
        folder_paths.set_output_directory(str(tmp_path / "output"))
        folder_paths.set_temp_directory(str(tmp_path / "temp"))
        yield tmp_path
        folder_paths.set_output_directory(old[0])
        folder_paths.set_temp_directory(old[1])

    def _block_ovoxel(dims=(6, 6, 6), resolution: int = 16, attributes: bool = True) -> OVoxel:
        """A solid block of dims (x, y, z) voxels, dual vertices at the voxel centres: a closed box surface."""
        axes = [torch.arange(n) + (resolution - n) // 2 for n in dims]
        coords = torch.cartesian_prod(*axes).int()
        count = coords.shape[0]
        flags = torch.ones(count, 3, dtype=torch.bool)
        attrs = None
        if attributes:
            attrs = torch.tensor([[0.2, 0.6, 0.4, 0.0, 0.5, 1.0]]).repeat(count, 1)
        return OVoxel(coords, resolution, torch.full((count, 3), 0.5), flags, torch.ones(count, 1), attributes=attrs)

    def _box_mesh(faces: bool = True) -> Mesh:
        box = trimesh.creation.box(extents=(0.4, 0.6, 0.2))
        return Mesh.from_numpy(box.vertices, box.faces if faces else np.zeros((0, 3), np.int64))

    # --------------------------------------------------------------------------------------------- schema
    def test_every_node_is_prefixed_categorised_and_every_input_has_a_tooltip():
        nodes = _nodes()
        ids = [n.GET_SCHEMA().node_id for n in nodes]
        assert len(ids) == len(set(ids)) == 14
        assert {"Trellis2LoadModel", "Trellis2UVBake", "Trellis2ExportGLB", "Trellis2PreviewGLB", "Trellis2MultiViewConditioning",
                "Trellis2LoadMesh", "Trellis2Retexture"} <= set(ids)
        for node in nodes:
            schema = node.GET_SCHEMA()
            assert schema.node_id.startswith("Trellis2") and schema.category == "3d/trellis2", schema.node_id
            missing = [i.id for i in schema.inputs if not i.tooltip]
            assert not missing, f"{schema.node_id}: inputs without tooltip {missing}"
        assert folder_paths.get_folder_paths("trellis2"), "the entry point registers models/trellis2"

    def test_model_choices_list_pipeline_folders_then_the_download(models_root):
        assert mgmt.pipeline_choices() == ["incomplete", "tiny", mgmt.DOWNLOAD_CHOICE]
        options = generation.Trellis2LoadModel.GET_SCHEMA().inputs[0].options
        assert options[-1] == mgmt.DOWNLOAD_CHOICE and "tiny" in options

    def test_incomplete_or_unknown_folder_gives_a_clear_error(models_root):
        with pytest.raises(CheckpointError, match=r"ckpts/ss_flow_img_dit_1_3B_64_bf16\.json"):
            generation.Trellis2LoadModel.execute("incomplete", "auto", "auto", False)
        with pytest.raises(InputError, match="no folder 'nowhere'"):
            generation.Trellis2LoadModel.execute("nowhere", "auto", "auto", False)

    def test_precision_and_device_policy():
        cpu = torch.device("cpu")
        assert mgmt.resolve_precision("auto", cpu) == (torch.float32, torch.float32)
        assert mgmt.resolve_precision("bf16", cpu) == (torch.bfloat16, torch.bfloat16)
        assert mgmt.resolve_precision("auto", torch.device("cuda")) == (None, torch.float32)
        with pytest.raises(InputError, match="fp16 is not supported on the CPU"):
            mgmt.resolve_precision("fp16", cpu)
        assert mgmt.resolve_devices("cpu") == (cpu, cpu)
        assert mgmt.resolve_devices("auto") == (cpu, cpu)  # --cpu: ComfyUI says so
        with pytest.raises(InputError, match="device_policy"):
            mgmt.resolve_devices("gpu0")

    # --------------------------------------------------------------------------------------------- model management
    def test_components_go_through_comfyui_model_management_and_load_once(models_root):
        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False).result[0]
        comps = pipe.components
        assert isinstance(comps, mgmt.ComfyComponents) and comps.loaded_roles == ()  # lazy: nothing read yet
        with comps.use("sparse_structure_decoder") as first:
            patcher = comps.patcher("sparse_structure_decoder")
            assert any(lm.model is patcher for lm in mm.current_loaded_models)
            assert patcher.model.module is first
        with comps.use("sparse_structure_decoder") as again:
            assert again is first  # one cache per handle: never read or held twice
        assert comps.loaded_roles == ("sparse_structure_decoder",)
        with comps.use("image_cond_model") as dino:
            assert hasattr(dino, "encode") and dino.model is comps.patcher("image_cond_model").model.module
        with pytest.raises(CheckpointError, match="no 'nope' model"):
            with comps.use("nope"):
                pass

    def test_kept_graphs_survive_a_repeated_load_and_go_with_an_unload(models_root, monkeypatch):
        """load_models_gpu detaches (unpatch_all=False) a model that is requested again without moving its weights:
        the graphs kept for it must stay; a real unload (or a partial one) releases them."""
        released = []
        monkeypatch.setattr(mgmt, "release_graphs", lambda module: released.append(module) or True)
        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False).result[0]
        comps = pipe.components
        for _ in range(2):
            with comps.use("sparse_structure_flow_model"):
                pass
        assert released == []
        module = comps.patcher("sparse_structure_flow_model").model.module
        comps.patcher("sparse_structure_flow_model").partially_unload(torch.device("cpu"), memory_to_free=1 << 40)
        assert released == [module]
        mm.unload_all_models()
        assert released == [module, module]

    def test_fp8_option_stores_the_flow_blocks_in_float8_through_model_management(models_root):
        from trellis2.trellis2_core.nn.fp8 import is_quantized

        names = [i.id for i in generation.Trellis2LoadModel.GET_SCHEMA().inputs]
        assert names[-1] == "fp8"  # appended: saved workflows keep their widget order
        pipe = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False, "auto", True).result[0]
        with pipe.components.use("shape_slat_flow_model_512") as flow:
            assert is_quantized(flow)
            assert flow.blocks[0].mlp.mlp[0].weight.dtype == torch.float8_e4m3fn
        with pipe.components.use("shape_slat_decoder") as dec:
            assert not is_quantized(dec)
        plain = generation.Trellis2LoadModel.execute("tiny", "fp32", "cpu", False).result[0]
        with plain.components.use("shape_slat_flow_model_512") as flow:
            assert not is_quantized(flow)

    # --------------------------------------------------------------------------------------------- generation
    def test_conditioning_errors_for_batches_and_empty_masks(model):
        image, mask = rgba_image()
        with pytest.raises(InputError, match="batch of 2"):
            generation.Trellis2Conditioning.execute(model, image.repeat(2, 1, 1, 1), "1 = background (LoadImage MASK)", "512", mask=mask)
        with pytest.raises(InputError, match="no pixel has alpha"):
            generation.Trellis2Conditioning.execute(model, image, "1 = object (segmentation MASK)", "512", mask=torch.zeros(1, 64, 64))
        with pytest.raises(InputError, match="no alpha channel"):
            generation.Trellis2Conditioning.execute(model, image, "1 = background (LoadImage MASK)", "512")

    def test_stage_chain_reproduces_one_pipeline_run_and_never_mutates_inputs(model):
        image, mask = rgba_image()
        image_before, mask_before = image.clone(), mask.clone()
        cond, crop = generation.Trellis2Conditioning.execute(model, image, "1 = background (LoadImage MASK)", "512", mask=mask).result
        assert torch.equal(image, image_before) and torch.equal(mask, mask_before)
        assert crop.shape == (1, 30, 30, 3)  # 2 * ((47 - 16) // 2), SPEC 13 and set(cond.tokens) == {512}
        tokens_before = cond.tokens[512].clone()
        fast = {stage: dict(steps=2, guidance_strength=g, guidance_rescale=r, guidance_interval_start=lo,
                            guidance_interval_end=hi, rescale_t=t)  # the official values, 2 steps
                for stage, (g, r, lo, hi, t) in {"ss": (7.5, 0.7, 0.6, 1.0, 5.0), "shape": (7.5, 0.5, 0.6, 1.0, 3.0),
                                                 "tex": (1.0, 0.0, 0.6, 0.9, 3.0)}.items()}  # fmt: skip
        updates = []
        old_hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
        try:
            (structure,) = generation.Trellis2SparseStructure.execute(model, cond, "512", 7, **fast["ss"]).result
        finally:
            comfy.utils.set_progress_bar_global_hook(old_hook)
        assert updates == [(1, 2), (2, 2)], updates  # one progress update per sampler step
        coords_before = structure.coords.clone()
        shape_latent, geometry = generation.Trellis2Geometry.execute(model, cond, structure, "512", seed=-1, max_tokens=49152, **fast["shape"]).result
        material, o_voxel = generation.Trellis2Material.execute(model, cond, shape_latent, geometry, seed=-1, **fast["tex"]).result
        assert torch.equal(structure.coords, coords_before) and torch.equal(cond.tokens[512], tokens_before)
        assert geometry.attributes is None and o_voxel.attributes is not None
        assert torch.equal(o_voxel.coords, geometry.coords)
        # One generator threaded through the engine's stages (what generate() does) gives the same latents:
        # the nodes continued the single random stream exactly.
        g = rng.generator(seed=7)
        params = {stage: generation._params(model, stage, **fast[key])
                  for stage, key in (("sparse_structure", "ss"), ("shape_slat", "shape"), ("tex_slat", "tex"))}  # fmt: skip
        ref_structure = model.structure(cond, pipeline_type="512", generator=g, params=params["sparse_structure"])
        ref_shape = model.shape(cond, ref_structure, pipeline_type="512", generator=g, params=params["shape_slat"])
        ref_material = model.material(cond, ref_shape, generator=g, params=params["tex_slat"])
        assert torch.equal(ref_structure.coords, structure.coords)
        assert torch.equal(ref_shape.latent.feats, shape_latent.latent.feats)
        assert torch.equal(ref_material.latent.feats, material.latent.feats)
        # A seed >= 0 on a later stage starts a fresh stream: a different shape latent on the same structure.
        other, _ = generation.Trellis2Geometry.execute(model, cond, structure, "512", seed=123, max_tokens=49152, **fast["shape"]).result
        assert not torch.allclose(other.latent.feats, shape_latent.latent.feats)

    def test_cancel_raises_comfyuis_interrupt_and_clears_the_flag(model):
        image, mask = rgba_image()
        (cond, _) = generation.Trellis2Conditioning.execute(model, image, "1 = background (LoadImage MASK)", "512", mask=mask).result
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                generation.Trellis2SparseStructure.execute(
                    model, cond, "512", 1, steps=3, guidance_strength=7.5, guidance_rescale=0.7,
                    guidance_interval_start=0.6, guidance_interval_end=1.0, rescale_t=5.0,
                )  # fmt: skip
            assert not mm.processing_interrupted(), "the flag must be cleared so the next prompt runs"
        finally:
            mm.interrupt_current_processing(False)

    def test_seed_minus_one_needs_an_upstream_stream():
        class NoState:
            rng_state = None

        with pytest.raises(InputError, match="set a seed >= 0"):
            generation._generator(-1, NoState(), "the structure")
        g = rng.generator(seed=5)
        state = g.get_state()
        assert torch.equal(generation._generator(-1, type("S", (), {"rng_state": state})(), "x").get_state(), state)

    # --------------------------------------------------------------------------------------------- MESH socket
    def test_mesh_socket_round_trip_keeps_everything_and_core_meshes_come_in():
        mesh = _box_mesh()
        maps = PBRMaps(np.full((8, 8, 4), 100, np.uint8), np.full((8, 8, 3), 50, np.uint8))
        textured = mesh.replace(uvs=torch.rand(mesh.num_vertices, 2), maps=maps)
        core = mesh_socket.to_comfy(textured)
        assert isinstance(core, Types.MESH) and core.vertices.shape == (1, 8, 3) and core.faces.shape == (1, 12, 3)
        assert core.uvs.shape == (1, 8, 2) and core.texture.shape == (1, 8, 8, 3)
        assert mesh_socket.from_comfy(core) is textured  # lossless (alpha, uint8 maps) while untouched
        # A core mesh (e.g. from VoxelToMesh) and a re-wrapped copy of ours come in through the fields.
        plain = Types.MESH(mesh.vertices[None].double(), mesh.faces[None].int())
        back = mesh_socket.from_comfy(plain)
        assert back.vertices.dtype == torch.float32 and back.faces.dtype == torch.int64 and back.num_faces == 12
        copy = Types.MESH(core.vertices.clone(), core.faces.clone())
        copy.uvs, copy.texture, copy.metallic_roughness = core.uvs, core.texture, core.metallic_roughness
        back = mesh_socket.from_comfy(copy)
        assert back.maps is not None and int(back.maps.base_color[0, 0, 0]) == 100 and int(back.maps.base_color[0, 0, 3]) == 255

    def test_mesh_socket_padded_batches_and_empty_meshes():
        a, b = _box_mesh(), trimesh.creation.icosphere(subdivisions=1)
        v = torch.zeros(2, len(b.vertices), 3)
        f = torch.zeros(2, len(b.faces), 3, dtype=torch.int64)
        v[0, :8], f[0, :12] = a.vertices, a.faces
        v[1], f[1] = torch.tensor(b.vertices, dtype=torch.float32), torch.tensor(b.faces)
        padded = Types.MESH(v, f)
        padded.vertex_counts, padded.face_counts = torch.tensor([8, len(b.vertices)]), torch.tensor([12, len(b.faces)])
        assert mesh_socket.batch_size(padded) == 2
        assert mesh_socket.from_comfy(padded, 0).num_faces == 12
        assert mesh_socket.from_comfy(padded, 1).num_faces == len(b.faces)
        with pytest.raises(InputError, match="has no faces"):
            mesh_socket.from_comfy(mesh_socket.to_comfy(_box_mesh(faces=False)))
        with pytest.raises(InputError, match=r"vertices \(B, N, 3\)"):
            mesh_socket.from_comfy(type("NotAMesh", (), {"vertices": torch.zeros(3), "faces": None})())

    def test_newer_core_mesh_fields_are_passed_to_the_constructor(monkeypatch):
        class NewMESH:
            def __init__(self, vertices, faces, uvs=None, normals=None, texture=None, metallic_roughness=None, vertex_counts=None):
                self.vertices, self.faces, self.uvs, self.normals = vertices, faces, uvs, normals
                self.texture, self.metallic_roughness, self.got = texture, metallic_roughness, (uvs is not None, texture is not None)

        monkeypatch.setattr(Types, "MESH", NewMESH)
        maps = PBRMaps(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8))
        mesh = _box_mesh().replace(uvs=torch.zeros(8, 2), maps=maps)
        assert mesh_socket.to_comfy(mesh).got == (True, True)

    # --------------------------------------------------------------------------------------------- mesh nodes
    def test_ovoxel_to_mesh_is_y_up_and_empty_surfaces_are_refused():
        ov = _block_ovoxel(dims=(2, 4, 6), resolution=16, attributes=False)
        (core,) = mesh_nodes.Trellis2OVoxelToMesh.execute(ov).result
        used = core.vertices[0][core.faces[0].unique()]
        extent = used.max(0).values - used.min(0).values
        # engine Z-up (x 2, y 4, z 6 voxels; centres span n - 1 voxels of 1/16) -> glTF Y-up: (x, z, -y)
        assert torch.allclose(extent, torch.tensor([1.0, 5.0, 3.0]) / 16, atol=1e-5), extent
        lonely = OVoxel(torch.tensor([[3, 3, 3]], dtype=torch.int32), 8, torch.full((1, 3), 0.5), torch.zeros(1, 3, dtype=torch.bool))
        with pytest.raises(InputError, match="o_voxel: the mesh has no faces"):
            mesh_nodes.Trellis2OVoxelToMesh.execute(lonely)

    def test_repair_decimate_bake_return_new_meshes_and_leave_inputs_alone():
        ov = _block_ovoxel()
        (core,) = mesh_nodes.Trellis2OVoxelToMesh.execute(ov).result
        verts_before = core.vertices.clone()
        repaired, report = mesh_nodes.Trellis2MeshRepair.execute(core, 1e-6, 1e-5, False, 0.03, True).result
        assert isinstance(report, str) and repaired is not core
        (small,) = mesh_nodes.Trellis2MeshDecimate.execute(repaired, 100, True).result
        assert 0 < small.faces.shape[1] < repaired.faces.shape[1]
        (textured,) = mesh_nodes.Trellis2UVBake.execute(small, ov, 64, True, False).result
        assert torch.equal(core.vertices, verts_before)
        ours = mesh_socket.from_comfy(textured)
        assert ours.uvs is not None and ours.maps.base_color.shape == (64, 64, 4)
        # constant voxel colour (0.2, 0.6, 0.4): every texel ends up that colour (charts sampled, the rest filled)
        assert np.abs(ours.maps.base_color[..., :3].astype(int) - [51, 153, 102]).max() <= 2
        assert int(ours.maps.metallic_roughness[..., 1].mean()) == 128  # roughness 0.5 in G
        assert ours.maps.normal is None  # off by default
        (with_normals,) = mesh_nodes.Trellis2UVBake.execute(small, ov, 64, True, False, True).result
        nm = mesh_socket.from_comfy(with_normals).maps.normal
        assert nm is not None and nm.shape == (64, 64, 3) and nm[..., 2].mean() > 128  # tangent-space: mostly +Z
        with pytest.raises(InputError, match="no PBR attributes"):
            mesh_nodes.Trellis2UVBake.execute(small, _block_ovoxel(attributes=False), 64, True, False)

    # --------------------------------------------------------------------------------------------- export
    def test_export_writes_numbered_glbs_never_overwriting_and_returns_the_ui_payload(out_dirs):
        core = mesh_socket.to_comfy(_box_mesh())
        first = export.Trellis2ExportGLB.execute(core, "trellis2/test", "OPAQUE", False, False)
        second = export.Trellis2ExportGLB.execute(core, "trellis2/test", "OPAQUE", False, False)
        (e1,), (e2,) = first.ui["glb"], second.ui["glb"]
        assert e1["type"] == "output" and e1["subfolder"] == "trellis2" and e1["filename"] != e2["filename"]
        assert first.result[0] == f"trellis2/{e1['filename']}"
        path = Path(folder_paths.get_output_directory()) / first.result[0]
        data = path.read_bytes()
        assert data[:4] == b"glTF"
        loaded = trimesh.load(path, force="mesh")
        assert len(loaded.faces) == 12
        preview = export.Trellis2PreviewGLB.execute(core, "AUTO", True, False)
        (p,) = preview.ui["glb"]
        assert p["type"] == "temp" and (Path(folder_paths.get_temp_directory()) / p["subfolder"] / p["filename"]).is_file()
