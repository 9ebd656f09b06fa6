"""Cancel during mesh post-processing: repair, decimation, unwrap and bake poll ``should_stop`` between their steps.

Engine half: for every poll point (a ``should_stop`` that turns True after k polls, k = 0 .. all polls - 1) the call
raises ``Interrupted`` naming the stage, leaves its inputs bit-identical and writes nothing; a ``should_stop`` that
never fires gives exactly (bitwise) the result of a call without one. Node half (re-run under ComfyUI's interpreter
like test_nodes_unit.py): the mesh nodes turn a Cancel into ComfyUI's InterruptProcessingException and clear the flag.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import trimesh

INNER = os.environ.get("TRELLIS2_NODES_INNER") == "1"


class StopAfter:
    """A should_stop() that answers False for the first k polls and True from then on; counts its polls."""

    def __init__(self, k: int):
        self.k, self.polls = k, 0

    def __call__(self) -> bool:
        self.polls += 1
        return self.polls > self.k


def _sphere(subdivisions: int = 3, radius: float = 0.35):
    from trellis2.trellis2_core.mesh.mesh import Mesh

    tm = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh.from_numpy(tm.vertices, tm.faces)


def _snapshot(*tensors) -> list[torch.Tensor]:
    return [t.clone() for t in tensors if t is not None]


def _same(before: list[torch.Tensor], *tensors) -> bool:
    now = [t for t in tensors if t is not None]
    return len(now) == len(before) and all(torch.equal(a, b) for a, b in zip(before, now))


def _maps_equal(a, b) -> bool:
    return (np.array_equal(a.base_color, b.base_color) and np.array_equal(a.metallic_roughness, b.metallic_roughness)
            and ((a.normal is None and b.normal is None) or np.array_equal(a.normal, b.normal)))


def _messages_of_every_poll(run) -> list[str]:
    """Run ``run(should_stop)`` once per poll point, stopping at poll 1, 2, ...; return the Interrupted messages."""
    from trellis2.trellis2_core.errors import Interrupted

    count = StopAfter(10**9)
    run(count)
    assert count.polls >= 3, f"expected several poll points, got {count.polls}"
    messages = []
    for k in range(count.polls):
        stop = StopAfter(k)
        with pytest.raises(Interrupted) as info:
            run(stop)
        assert stop.polls == k + 1, "the call must stop at the first True, not poll on"
        messages.append(str(info.value))
    return messages


if not INNER:
    from trellis2.trellis2_core.mesh import bake as bake_module
    from trellis2.trellis2_core.mesh.bake import bake_textures
    from trellis2.trellis2_core.mesh.postprocess import bake_ovoxel, textured_mesh
    from trellis2.trellis2_core.ovoxel import OVoxel, mesh_to_flexible_dual_grid
    from trellis2.trellis2_core.ovoxel.attributes import VoxelAttributeField

    R = 32

    def _ovoxel(mesh) -> OVoxel:
        coords, offset, flags = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, R)
        ov = OVoxel(coords, R, offset.float(), flags)
        c = ov.voxel_centers()
        attrs = torch.cat([(c + 0.5).clamp(0, 1), torch.full_like(c[:, :1], 0.25), torch.full_like(c[:, :1], 0.75),
                           torch.ones_like(c[:, :1])], 1)  # fmt: skip
        return ov.with_attributes(attrs)

    @pytest.fixture(scope="module")
    def sphere():
        return _sphere(3)

    @pytest.fixture(scope="module")
    def unwrapped(sphere):
        pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
        from trellis2.trellis2_core.mesh.uv import unwrap

        return unwrap(sphere, texture_size=64)

    @pytest.mark.parametrize("normal_map", [False, True])
    def test_bake_stops_at_every_poll_point_and_never_firing_changes_nothing(unwrapped, monkeypatch, normal_map):
        # small pieces so the projection is split (and polled) inside a chunk, as 2^18-texel pieces are in production
        monkeypatch.setattr(bake_module, "PROJECT_PIECE", 400)
        field = VoxelAttributeField(*_field_arrays())
        reference = _sphere(4, radius=0.36)
        kw = dict(texture_size=64, reference=reference, chunk=1024, normal_map=normal_map)
        before = _snapshot(unwrapped.vertices, unwrapped.faces, unwrapped.uvs, field.attrs, reference.vertices,
                           reference.faces)  # fmt: skip
        plain = bake_textures(unwrapped, field, R, **kw)
        never = bake_textures(unwrapped, field, R, should_stop=lambda: False, **kw)
        assert _maps_equal(plain, never)
        messages = _messages_of_every_poll(lambda stop: bake_textures(unwrapped, field, R, should_stop=stop, **kw))
        assert messages[0] == "texture bake interrupted before rasterising the UV layout"
        assert messages[-1] == "texture bake interrupted before the seam fill"
        assert any("while projecting texels" in m for m in messages)  # inside a chunk, between projection pieces
        assert any(m.startswith("texture bake interrupted while sampling texels (chunk 2/") for m in messages)
        assert _same(before, unwrapped.vertices, unwrapped.faces, unwrapped.uvs, field.attrs, reference.vertices,
                     reference.faces)  # fmt: skip

    def _field_arrays():
        c = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return c, torch.cat([(c.float() + 0.5) / R, torch.full((len(c), 3), 0.5)], 1)

    def test_textured_mesh_names_each_stage_keeps_inputs_and_writes_nothing(tmp_path, monkeypatch):
        pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
        pytest.importorskip("fast_simplification", reason="decimation backend 'fast-simplification' not installed")
        monkeypatch.chdir(tmp_path)
        full = _sphere(4)
        coords, attrs = _field_arrays()
        before = _snapshot(full.vertices, full.faces, coords, attrs)
        kw = dict(decimation_target=300, texture_size=64, normal_map=True)
        plain, _ = textured_mesh(full, coords, attrs, R, **kw)
        never, _ = textured_mesh(full, coords, attrs, R, should_stop=lambda: False, **kw)
        assert _maps_equal(plain.maps, never.maps)
        assert torch.equal(plain.vertices, never.vertices) and torch.equal(plain.uvs, never.uvs)
        assert torch.equal(plain.faces, never.faces) and torch.equal(plain.tangents, never.tangents)
        messages = _messages_of_every_poll(lambda stop: textured_mesh(full, coords, attrs, R, should_stop=stop, **kw))
        stages = ["mesh post-processing interrupted before the repair", "mesh repair interrupted before welding",
                  "mesh repair interrupted before orienting faces",
                  "mesh post-processing interrupted before the decimation",
                  "mesh decimation interrupted before the edge collapses",
                  "mesh decimation interrupted after the edge collapses (result dropped)",
                  "mesh post-processing interrupted before the UV unwrap",
                  "mesh post-processing interrupted before the bake (after the UV unwrap)",
                  "texture bake interrupted before rasterising the UV layout",
                  "texture bake interrupted before the seam fill"]  # fmt: skip
        positions = [messages.index(s) for s in stages]  # each stage is polled, in chain order
        assert positions == sorted(positions), messages
        assert _same(before, full.vertices, full.faces, coords, attrs)
        assert not any(tmp_path.iterdir()), "an interrupted post-process must not write files"

    def test_bake_ovoxel_names_each_stage_and_keeps_inputs(sphere):
        pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
        ov = _ovoxel(sphere)
        before = _snapshot(sphere.vertices, sphere.faces, ov.coords, ov.attributes, ov.vertex_offset, ov.edge_flags)
        kw = dict(texture_size=64, project_to_surface=True, normal_map=True)
        plain = bake_ovoxel(sphere, ov, **kw)
        never = bake_ovoxel(sphere, ov, should_stop=lambda: False, **kw)
        assert _maps_equal(plain.maps, never.maps) and torch.equal(plain.uvs, never.uvs)
        assert torch.equal(plain.vertices, never.vertices) and torch.equal(plain.tangents, never.tangents)
        messages = _messages_of_every_poll(lambda stop: bake_ovoxel(sphere, ov, should_stop=stop, **kw))
        assert messages[:3] == ["mesh post-processing interrupted before the UV unwrap",
                                "mesh post-processing interrupted after the UV unwrap (before the bake)",
                                "mesh post-processing interrupted before the bake"]  # fmt: skip
        assert messages[3:] and all(m.startswith("texture bake interrupted") for m in messages[3:])
        assert _same(before, sphere.vertices, sphere.faces, ov.coords, ov.attributes, ov.vertex_offset, ov.edge_flags)

    def test_retexture_bake_passes_should_stop_down(sphere):
        pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
        from trellis2.trellis2_core.pipeline.retexture import MeshNormalization, bake_onto_mesh

        ov = _ovoxel(sphere)
        identity = MeshNormalization((0.0, 0.0, 0.0), 1.0)
        before = _snapshot(sphere.vertices, sphere.faces, ov.attributes)
        plain, _ = bake_onto_mesh(sphere, ov, identity, texture_size=64, keep_uvs=False)
        never, _ = bake_onto_mesh(sphere, ov, identity, texture_size=64, keep_uvs=False, should_stop=lambda: False)
        assert _maps_equal(plain.maps, never.maps)
        messages = _messages_of_every_poll(
            lambda stop: bake_onto_mesh(sphere, ov, identity, texture_size=64, keep_uvs=False, should_stop=stop))
        assert messages[:2] == ["retexture interrupted before the UV unwrap", "retexture interrupted before the bake"]
        assert all(m.startswith("texture bake interrupted") for m in messages[2:])
        assert _same(before, sphere.vertices, sphere.faces, ov.attributes)

    @pytest.mark.slow
    def test_mesh_node_cancel_suite_inside_comfyui_python():
        from comfy_inner import run_inner_suite

        run_inner_suite(__file__, timeout=600)

else:
    sys.path.insert(0, os.environ["TRELLIS2_COMFYUI_DIR"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it: this suite runs on the CPU
    import comfy.model_management as mm

    from trellis2.nodes import mesh_nodes, mesh_socket
    from trellis2.trellis2_core.mesh import postprocess
    from trellis2.trellis2_core.ovoxel.ovoxel import OVoxel

    def _block_ovoxel(dims=(6, 6, 6), resolution: int = 16) -> OVoxel:
        """A solid block of voxels with constant PBR attributes (as in test_nodes_unit.py)."""
        axes = [torch.arange(n) + (resolution - n) // 2 for n in dims]
        coords = torch.cartesian_prod(*axes).int()
        count = coords.shape[0]
        attrs = torch.tensor([[0.2, 0.6, 0.4, 0.0, 0.5, 1.0]]).repeat(count, 1)
        return OVoxel(coords, resolution, torch.full((count, 3), 0.5), torch.ones(count, 3, dtype=torch.bool),
                      torch.ones(count, 1), attributes=attrs)  # fmt: skip

    @pytest.fixture
    def interrupt_flag():
        mm.interrupt_current_processing(False)
        yield
        mm.interrupt_current_processing(False)

    def _core_mesh():
        return mesh_socket.to_comfy(mesh_socket.from_engine_frame(_sphere(2)))

    def test_cancel_in_repair_decimate_and_bake_nodes_is_comfyuis_interrupt(interrupt_flag):
        core, ov = _core_mesh(), _block_ovoxel()
        before = core.vertices.clone(), core.faces.clone()
        calls = [
            lambda: mesh_nodes.Trellis2MeshRepair.execute(core, 1e-6, 1e-5, False, 0.03, True),
            lambda: mesh_nodes.Trellis2MeshDecimate.execute(core, 100, True),
            lambda: mesh_nodes.Trellis2UVBake.execute(core, ov, 64, True, False, True),
        ]
        for call in calls:
            mm.interrupt_current_processing(True)
            with pytest.raises(mm.InterruptProcessingException):
                call()
            assert not mm.processing_interrupted(), "the flag must be cleared so the next prompt runs"
        assert torch.equal(core.vertices, before[0]) and torch.equal(core.faces, before[1])
        (textured,) = mesh_nodes.Trellis2UVBake.execute(core, ov, 64, True, False).result  # the next run works
        assert mesh_socket.from_comfy(textured).maps.base_color.shape == (64, 64, 4)

    def test_cancel_pressed_during_the_unwrap_stops_before_the_bake(interrupt_flag, monkeypatch):
        real_unwrap, baked = postprocess.unwrap, []

        def unwrap_then_cancel(*args, **kwargs):  # the user presses Cancel while xatlas runs (one C call)
            out = real_unwrap(*args, **kwargs)
            mm.interrupt_current_processing(True)
            return out

        monkeypatch.setattr(postprocess, "unwrap", unwrap_then_cancel)
        monkeypatch.setattr(postprocess, "bake_textures", lambda *a, **k: baked.append(1))
        with pytest.raises(mm.InterruptProcessingException) as info:
            mesh_nodes.Trellis2UVBake.execute(_core_mesh(), _block_ovoxel(), 64, True, False)
        assert "after the UV unwrap" in str(info.value.__context__)  # the Interrupted it replaced
        assert not baked and not mm.processing_interrupted()
