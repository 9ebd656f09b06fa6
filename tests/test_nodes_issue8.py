"""Issue 8's nodes (multi-view conditioning, mesh loading, retexture) against ComfyUI 0.3.75's Python, on the CPU.

Same two-level scheme as test_nodes_unit.py: the outer test re-runs this file under the ComfyUI install's
interpreter with ``TRELLIS2_NODES_INNER=1``; the inner tests call the nodes' ``execute`` with the tiny snapshot.
Retexturing runs at grid 64 (the node offers 512 / 1024; the test widens the choice) with 2 steps.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

INNER = os.environ.get("TRELLIS2_NODES_INNER") == "1"

if not INNER:

    @pytest.mark.slow
    def test_issue8_node_suite_inside_comfyui_python():
        from comfy_inner import run_inner_suite

        run_inner_suite(__file__, timeout=900)

else:
    sys.path.insert(0, os.environ["TRELLIS2_COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it: this suite runs on the CPU
    import numpy as np
    import torch
    import trimesh

    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from trellis2.nodes import generation, mesh_socket, multiview
    from trellis2.nodes import retexture as retex
    from trellis2.trellis2_core.errors import CheckpointError, InputError
    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    LOADIMAGE = "1 = background (LoadImage MASK)"
    TEX = dict(steps=2, guidance_strength=1.0, guidance_rescale=0.0, guidance_interval_start=0.6,
               guidance_interval_end=0.9, rescale_t=3.0)  # fmt: skip

    @pytest.fixture(scope="module")
    def models_root(tmp_path_factory):
        """models/trellis2 with the tiny snapshot as 'tiny' and a copy without texturing_pipeline.json as 'notex'."""
        root = tmp_path_factory.mktemp("trellis2_models")
        write_tiny_snapshot(root / "tiny", seed=0)
        shutil.copytree(root / "tiny", root / "notex", ignore=shutil.ignore_patterns("texturing_pipeline.json"))
        folder_paths.folder_names_and_paths["trellis2"] = ([str(root)], set())
        return root

    @pytest.fixture(scope="module")
    def model(models_root):
        return generation.Trellis2LoadModel.execute("tiny", "auto", "auto", False).result[0]

    @pytest.fixture
    def input_dir(tmp_path):
        old = folder_paths.get_input_directory()
        folder_paths.set_input_directory(str(tmp_path / "input"))
        (tmp_path / "input" / "3d").mkdir(parents=True)
        yield tmp_path / "input"
        folder_paths.set_input_directory(old)

    def _views(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """IMAGE [V, 64, 64, 3] and LoadImage-style MASK [V, 64, 64] (1 = background): a square per view."""
        images, masks = torch.zeros(count, 64, 64, 3), torch.ones(count, 64, 64)
        for v in range(count):
            lo = 12 + 4 * v
            images[v, lo:52, 16:48] = torch.tensor([0.8, 0.3 + 0.1 * v, 0.2])
            masks[v, lo:52, 16:48] = 0
        return images, masks

    def _thin_box(uvs: bool = True) -> trimesh.Trimesh:
        box = trimesh.creation.box(extents=(1.0, 0.2, 0.3))
        box.unmerge_vertices()
        visual = None
        if uvs:
            uv = np.tile(np.array([[0.1, 0.2], [0.9, 0.2], [0.5, 0.8]]), (len(box.faces), 1))
            visual = trimesh.visual.TextureVisuals(uv=uv)
        v = np.asarray(box.vertices) * 2.5 + np.array([4.0, 1.0, -3.0])
        return trimesh.Trimesh(v, np.asarray(box.faces), visual=visual, process=False)

    # --------------------------------------------------------------------------------------------- multi-view
    def test_multiview_node_one_view_equals_the_single_image_node_and_views_stack(model):
        images, masks = _views(2)
        before = images.clone(), masks.clone()
        single, _ = generation.Trellis2Conditioning.execute(model, images[:1], LOADIMAGE, "512", mask=masks[:1]).result
        one, crop1 = multiview.Trellis2MultiViewConditioning.execute(model, images[:1], LOADIMAGE, "512", "concat", masks=masks[:1]).result
        assert torch.equal(one.tokens[512], single.tokens[512]) and crop1.shape[0] == 1
        two, crops = multiview.Trellis2MultiViewConditioning.execute(model, images, LOADIMAGE, "512", "average", masks=masks).result
        assert two.tokens[512].shape[:2] == (2, 1029) and two.multiview_mode == "average" and two.num_views == 2
        assert torch.equal(two.tokens[512][:1], single.tokens[512])  # view 1 is encoded exactly as alone
        assert not torch.equal(two.tokens[512][0], two.tokens[512][1])
        assert crops.shape[0] == 2 and crops.shape[1] == crops.shape[2] and crops.shape[3] == 3
        assert torch.equal(images, before[0]) and torch.equal(masks, before[1])
        # RGBA views (Join Image with Alpha) need no mask
        rgba = torch.cat([images, 1 - masks[..., None]], dim=-1)
        again, _ = multiview.Trellis2MultiViewConditioning.execute(model, rgba, LOADIMAGE, "512", "average").result
        assert torch.equal(again.tokens[512], two.tokens[512])

    def test_multiview_node_errors_name_the_view_and_the_fix(model):
        images, masks = _views(3)
        with pytest.raises(InputError, match=r"one mask per view \(3\); got a batch of 2"):
            multiview.Trellis2MultiViewConditioning.execute(model, images, LOADIMAGE, "512", "concat", masks=masks[:2])
        empty = masks.clone()
        empty[1] = 1  # view 2 is all background
        with pytest.raises(InputError, match="view 2 of 3: .*no pixel"):
            multiview.Trellis2MultiViewConditioning.execute(model, images, LOADIMAGE, "512", "concat", masks=empty)
        with pytest.raises(InputError, match="multiview_mode must be one of"):
            multiview.Trellis2MultiViewConditioning.execute(model, images, LOADIMAGE, "512", "sum", masks=masks)
        with pytest.raises(InputError, match="Trellis2MultiViewConditioning"):  # the single node points to this one
            generation.Trellis2Conditioning.execute(model, images, LOADIMAGE, "512", mask=masks)

    # --------------------------------------------------------------------------------------------- load mesh
    def test_load_mesh_lists_input_files_and_keeps_vertices_faces_and_uvs(input_dir):
        box = _thin_box()
        (input_dir / "3d" / "box.glb").write_bytes(box.export(file_type="glb"))
        _thin_box(uvs=False).export(input_dir / "plain.ply")
        (input_dir / "notes.txt").write_text("not a mesh")
        assert retex.mesh_files() == ["3d/box.glb", "plain.ply"]
        assert retex.Trellis2LoadMesh.GET_SCHEMA().inputs[0].options == ["3d/box.glb", "plain.ply"]
        (core,) = retex.Trellis2LoadMesh.execute("3d/box.glb").result
        mesh = mesh_socket.from_comfy(core)
        assert torch.allclose(mesh.vertices, torch.tensor(box.vertices, dtype=torch.float32), atol=1e-6)
        assert torch.equal(mesh.faces, torch.tensor(box.faces, dtype=torch.int64))
        # glTF convention: v measured from the top, trimesh's from the bottom
        assert torch.allclose(mesh.uvs[:3], torch.tensor([[0.1, 0.8], [0.9, 0.8], [0.5, 0.2]]), atol=1e-6)
        (plain,) = retex.Trellis2LoadMesh.execute("plain.ply").result
        assert mesh_socket.from_comfy(plain).uvs is None and plain.faces.shape == (1, 12, 3)
        first = retex.Trellis2LoadMesh.fingerprint_inputs(mesh_file="plain.ply")
        _thin_box(uvs=False).apply_scale(2.0).export(input_dir / "plain.ply")
        os.utime(input_dir / "plain.ply", ns=(1, 10**18))
        assert retex.Trellis2LoadMesh.fingerprint_inputs(mesh_file="plain.ply") != first  # re-read a changed file
        with pytest.raises(InputError, match="not a file in ComfyUI's input folder"):
            retex.Trellis2LoadMesh.execute("../outside.glb")
        (input_dir / "broken.glb").write_bytes(b"glTF nonsense")
        with pytest.raises(InputError, match="could not read 'broken.glb'"):
            retex.Trellis2LoadMesh.execute("broken.glb")

    # --------------------------------------------------------------------------------------------- retexture
    @pytest.fixture
    def grid64(monkeypatch):
        monkeypatch.setattr(retex, "RETEXTURE_RESOLUTIONS", ("1024", "512", "64"))

    @pytest.fixture(scope="module")
    def cond(model):
        images, masks = _views(1)
        return generation.Trellis2Conditioning.execute(model, images, mask=masks, mask_convention=LOADIMAGE, resolutions="512").result[0]

    def test_retexture_keeps_geometry_in_the_user_frame_and_is_deterministic(model, cond, grid64, monkeypatch):
        # Newer ComfyUI (0.18+) throttles progress updates closer than 0.1 s; tiny-model steps are faster than that.
        monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0, raising=False)
        box = _thin_box()
        core = mesh_socket.to_comfy(_engine(box))
        verts_before, tokens_before = core.vertices.clone(), cond.tokens[512].clone()
        updates = []
        old_hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
        try:
            (out,) = retex.Trellis2Retexture.execute(model, cond, core, 5, "64", 64, True, **TEX).result
        finally:
            comfy.utils.set_progress_bar_global_hook(old_hook)
        assert updates[-1] == (4, 4) and len(updates) >= 3  # encode, 2 steps, decode + bake
        assert torch.equal(core.vertices, verts_before) and torch.equal(cond.tokens[512], tokens_before)
        got, user = mesh_socket.from_comfy(out), mesh_socket.from_comfy(core)
        assert torch.equal(got.vertices, user.vertices) and torch.equal(got.faces, user.faces)
        assert torch.equal(got.uvs, user.uvs)  # keep_uvs with UVs: the user's own
        assert got.maps.base_color.shape == (64, 64, 4) and got.maps.base_color[..., :3].std() > 0
        assert "shape_slat_encoder" in model.components.loaded_roles  # resolved from texturing_pipeline.json
        (same,) = retex.Trellis2Retexture.execute(model, cond, core, 5, "64", 64, True, **TEX).result
        assert np.array_equal(mesh_socket.from_comfy(same).maps.base_color, got.maps.base_color)
        # keep_uvs off: unwrapped anew, faces and positions kept (seam vertices are copies of user vertices)
        (fresh,) = retex.Trellis2Retexture.execute(model, cond, core, 5, "64", 64, False, **TEX).result
        fresh = mesh_socket.from_comfy(fresh)
        assert fresh.num_faces == user.num_faces and fresh.num_vertices >= user.num_vertices
        corners = fresh.vertices[fresh.faces.reshape(-1)]
        assert torch.equal(corners, user.vertices[user.faces.reshape(-1)])

    def _engine(box):
        from trellis2.trellis2_core.mesh.mesh import Mesh

        uv = np.asarray(box.visual.uv)
        return Mesh.from_numpy(box.vertices, box.faces, uvs=np.stack([uv[:, 0], 1 - uv[:, 1]], 1))

    def test_retexture_errors_and_cancel(model, cond, grid64, models_root):
        core = mesh_socket.to_comfy(_engine(_thin_box()))
        with pytest.raises(InputError, match="needs DINOv3 tokens at 1024"):
            retex.Trellis2Retexture.execute(model, cond, core, 5, "1024", 64, True, **TEX)
        pair = type(core)(core.vertices.repeat(2, 1, 1), core.faces.repeat(2, 1, 1))
        with pytest.raises(InputError, match="MESH batch of 2"):
            retex.Trellis2Retexture.execute(model, cond, pair, 5, "64", 64, True, **TEX)
        notex = generation.Trellis2LoadModel.execute("notex", "auto", "auto", False).result[0]
        with pytest.raises(CheckpointError, match="texturing_pipeline.json"):
            retex.Trellis2Retexture.execute(notex, cond, core, 5, "64", 64, True, **TEX)
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                retex.Trellis2Retexture.execute(model, cond, core, 5, "64", 64, True, **TEX)
            assert not mm.processing_interrupted(), "the flag must be cleared so the next prompt runs"
        finally:
            mm.interrupt_current_processing(False)
