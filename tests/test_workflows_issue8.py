"""Issue 8's workflows on a real ComfyUI 0.3.75 with the tiny snapshot: retexture a user's mesh, multi-view to 3D.

Both workflows are also checked by test_workflows.py (UI format, links, widgets against /object_info, server-side
validation). Here they RUN: the retexture workflow on a thin box GLB with its own UVs placed in input/3d/ (the
output GLB must keep the file's vertices, faces and UVs), the multi-view one with two different views.
"""

from __future__ import annotations

import io as _io

import numpy as np
import pytest

from comfy_harness import comfy_server  # noqa: F401  (session fixture tiny_server builds on)
from test_workflows import ROOT, TINY, api_graph, load, tiny_server  # noqa: F401  (tiny_server: fixture)

RETEXTURE = ROOT / "workflows" / "trellis2_retexture_mesh.json"
MULTIVIEW = ROOT / "workflows" / "trellis2_multiview_to_3d.json"
MESH_FILE = "3d/trellis2_thin_box.glb"  # input/3d/: where core's Load3D uploads go


def _thin_box():
    """A thin box (so the 512 grid stays small on a CPU) with per-face UVs inside [0, 1], off-centre and scaled."""
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 0.08, 0.1))
    box.unmerge_vertices()  # 36 vertices: one UV triple per face
    corners = np.array([[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]])
    uv = np.tile(corners, (len(box.faces), 1))
    vertices = np.asarray(box.vertices) * 3.7 + np.array([10.0, -2.0, 5.0])
    return trimesh.Trimesh(vertices, np.asarray(box.faces), visual=trimesh.visual.TextureVisuals(uv=uv), process=False)


def _load(data: bytes):
    import trimesh

    scene = trimesh.load(_io.BytesIO(data), file_type="glb", process=False)
    (mesh,) = scene.geometry.values()
    return mesh


@pytest.fixture(scope="module")
def issue8_server(tiny_server):  # noqa: F811
    from PIL import Image

    (tiny_server.input_dir / "3d").mkdir(exist_ok=True)
    (tiny_server.input_dir / MESH_FILE).write_bytes(_thin_box().export(file_type="glb"))
    side = Image.new("RGBA", (80, 96), (0, 0, 0, 0))
    side.paste((60, 160, 220, 255), (30, 10, 50, 86))
    side.save(tiny_server.input_dir / "trellis2_side.png")
    return tiny_server


@pytest.mark.comfy
@pytest.mark.slow
def test_retexture_workflow_keeps_the_users_geometry_and_uvs(issue8_server):
    client = issue8_server.client
    overrides = {
        "Trellis2LoadModel": {"pipeline": "tiny"},
        "Trellis2LoadMesh": {"mesh_file": MESH_FILE},
        "LoadImage": {"image": "trellis2_object.png"},
        "Trellis2Conditioning": {"resolutions": "512"},
        "Trellis2Retexture": {"resolution": "512", "steps": 2, "texture_size": 128, "seed": 3},
    }
    graph = api_graph(load(RETEXTURE), client.object_info(), overrides)
    result = client.run(graph, timeout=600)
    entries = result.files("glb")
    assert {e["type"] for e in entries} == {"output", "temp"}  # export + preview
    (out,) = [e for e in entries if e["type"] == "output"]
    data = client.view(**out)
    assert data[:4] == b"glTF"
    user, got = _load((issue8_server.input_dir / MESH_FILE).read_bytes()), _load(data)
    assert len(got.vertices) == len(user.vertices) == 36 and len(got.faces) == len(user.faces) == 12
    np.testing.assert_array_equal(np.asarray(got.faces), np.asarray(user.faces))
    np.testing.assert_allclose(np.asarray(got.vertices), np.asarray(user.vertices), atol=1e-5)  # user frame + scale
    np.testing.assert_allclose(got.visual.uv, user.visual.uv, atol=1e-6)  # keep_uvs: the file's own UVs
    texture = got.visual.material.baseColorTexture
    assert texture.size == (128, 128) and np.asarray(texture).std() > 0
    retex = next(k for k, n in graph.items() if n["class_type"] == "Trellis2Retexture")
    progress = [m["data"] for m in client.messages(result.prompt_id) if m["type"] == "progress" and m["data"]["node"] == retex]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 4  # encode + 2 steps + decode/bake


@pytest.mark.comfy
@pytest.mark.slow
def test_multiview_workflow_runs_with_two_views(issue8_server):
    client = issue8_server.client
    overrides = {**TINY, "Trellis2MultiViewConditioning": {"resolutions": "512"},
                 1: {"image": "trellis2_object.png"}, 2: {"image": "trellis2_side.png"}}  # fmt: skip
    graph = api_graph(load(MULTIVIEW), client.object_info(), overrides)
    assert [graph[k]["inputs"]["image"] for k in ("1", "2")] == ["trellis2_object.png", "trellis2_side.png"]
    result = client.run(graph, timeout=900)
    (glb,) = [e for e in result.files("glb") if e["type"] == "output"]
    mesh = _load(client.view(**glb))
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture.size == (128, 128)
    assert len(result.files("images")) == 2  # the preview shows both views' crops
