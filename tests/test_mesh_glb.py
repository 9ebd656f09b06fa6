"""GLB export: Khronos glTF validator (zero errors), trimesh round trip, alpha modes, WebP, safe file writing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.glb import export_glb
from trellis2.trellis2_core.mesh.mesh import Mesh, PBRMaps, mesh_zup_to_yup, vertex_normals

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def validate():
    """validate(path) -> the Khronos validator's report for one GLB (installs tests/js on first use)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Khronos glTF validator (npm gltf-validator) needs Node.js")
    if not (JS / "node_modules" / "gltf-validator").is_dir():
        npm = shutil.which("npm")
        r = subprocess.run([npm or "npm", "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True)
        assert r.returncode == 0, f"npm ci in {JS} failed; run it by hand: npm ci --prefix tests/js\n{r.stderr[-2000:]}"

    def run(path):
        r = subprocess.run([node, str(JS / "validate.js"), str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)[0]

    return run


def _errors(report):
    return [m for m in report["issues"]["messages"] if m["severity"] == 0]


def _textured_mesh(size=32, alpha=255):
    """A unit-ish quad pair in the engine frame with UVs and synthetic maps (channels encode uv for checks)."""
    v = torch.tensor([[-0.3, -0.3, 0.1], [0.3, -0.3, 0.1], [0.3, 0.3, 0.1], [-0.3, 0.3, 0.1]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    bc = np.zeros((size, size, 4), np.uint8)
    bc[..., 0] = ramp[None, :]
    bc[..., 1] = ramp[:, None]
    bc[..., 3] = alpha
    mr = np.zeros((size, size, 3), np.uint8)
    mr[..., 1], mr[..., 2] = 200, 30
    mesh = Mesh(v, f, normals=vertex_normals(v, f), uvs=uv, maps=PBRMaps(bc, mr))
    return mesh_zup_to_yup(mesh)


def test_pbr_glb_validates_and_round_trips(tmp_path, validate):
    mesh = _textured_mesh()
    path = export_glb(mesh, tmp_path / "quad.glb")
    report = validate(path)
    assert report["issues"]["numErrors"] == 0, _errors(report)
    scene = trimesh.load(path, force="scene")
    (geom,) = scene.geometry.values()
    np.testing.assert_allclose(np.asarray(geom.vertices), mesh.vertices.numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(geom.faces), mesh.faces.numpy())
    uv_file = np.asarray(geom.visual.uv).copy()
    uv_file[:, 1] = 1 - uv_file[:, 1]                                  # trimesh reports v up; the file holds ours
    np.testing.assert_allclose(uv_file, mesh.uvs.numpy(), atol=1e-6)
    assert uv_file.min() >= 0 and uv_file.max() <= 1
    mat = geom.visual.material
    assert mat.baseColorTexture.size == (32, 32) and mat.metallicRoughnessTexture.size == (32, 32)
    assert mat.metallicFactor == 1.0 and mat.roughnessFactor == 1.0 and mat.alphaMode in (None, "OPAQUE")
    bc = np.asarray(mat.baseColorTexture.convert("RGBA"))
    np.testing.assert_array_equal(bc, mesh.maps.base_color)            # PNG: lossless, rows not flipped
    mr = np.asarray(mat.metallicRoughnessTexture.convert("RGB"))
    assert (mr[..., 1] == 200).all() and (mr[..., 2] == 30).all()
    # the frame change (x, y, z) -> (x, z, -y): the engine's z = 0.1 plane is now y = 0.1 (Y-up)
    np.testing.assert_allclose(np.asarray(geom.vertices)[:, 1], 0.1, atol=1e-6)


@pytest.mark.parametrize("mode,alpha,expect", [("AUTO", 255, "OPAQUE"), ("AUTO", 100, "BLEND"), ("MASK", 100, "MASK"),
                                                ("BLEND", 255, "BLEND")])
def test_alpha_modes(tmp_path, validate, mode, alpha, expect):
    path = export_glb(_textured_mesh(alpha=alpha), tmp_path / "a.glb", alpha_mode=mode, alpha_cutoff=0.25)
    assert validate(path)["issues"]["numErrors"] == 0
    gltf = _json_chunk(path)
    mat = gltf["materials"][0]
    assert mat.get("alphaMode", "OPAQUE") == expect
    if expect == "MASK":
        assert mat["alphaCutoff"] == 0.25


def test_webp_textures(tmp_path, validate):
    path = export_glb(_textured_mesh(), tmp_path / "w.glb", webp=True, double_sided=True)
    report = validate(path)
    assert report["issues"]["numErrors"] == 0, _errors(report)
    gltf = _json_chunk(path)
    assert "EXT_texture_webp" in gltf.get("extensionsRequired", [])
    assert {im["mimeType"] for im in gltf["images"]} == {"image/webp"}
    assert gltf["materials"][0]["doubleSided"] is True


def test_geometry_only_glb_validates(tmp_path, validate):
    s = trimesh.creation.icosphere(subdivisions=2)
    path = export_glb(Mesh.from_numpy(s.vertices, s.faces), tmp_path / "plain.glb")
    assert validate(path)["issues"]["numErrors"] == 0
    assert len(trimesh.load(path, force="mesh").faces) == len(s.faces)


def test_never_clobbers_and_writes_only_the_destination(tmp_path):
    mesh = _textured_mesh(size=8)
    dest = tmp_path / "out.glb"
    dest.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_glb(mesh, dest)
    assert dest.read_bytes() == b"keep me"
    export_glb(mesh, dest, overwrite=True)
    assert dest.read_bytes()[:4] == b"glTF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.glb"]    # no temp files left behind
    with pytest.raises(InputError, match=".glb"):
        export_glb(mesh, tmp_path / "out.gltf")
    with pytest.raises(InputError, match="does not exist"):
        export_glb(mesh, tmp_path / "missing" / "x.glb")
    with pytest.raises(InputError, match="alpha_mode"):
        export_glb(mesh, tmp_path / "y.glb", alpha_mode="CLEAR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.glb"]


def _json_chunk(path):
    data = Path(path).read_bytes()
    n = int.from_bytes(data[12:16], "little")
    return json.loads(data[20:20 + n])


def test_full_chain_from_a_decoded_like_mesh_to_a_valid_glb(tmp_path, validate):
    """repair -> decimate -> unwrap -> bake -> export on a randomly wound sphere with a hole, voxels on its shell."""
    pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
    pytest.importorskip("fast_simplification", reason="decimation backend 'fast-simplification' not installed")
    from trellis2.trellis2_core.mesh.postprocess import textured_mesh

    s = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    f = np.asarray(s.faces)[1:].copy()            # a one-face hole, perimeter ~0.06: filled with the 0.1 threshold
    flip = np.random.default_rng(0).random(len(f)) < 0.5
    f[flip] = f[flip][:, ::-1]
    res = 32
    grid = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = (grid.float() + 0.5) / res - 0.5
    shell = (centre.norm(dim=1) - 0.3).abs() < 2.0 / res                 # occupied voxels near the surface only
    coords = grid[shell]
    attrs = torch.cat([centre[shell] + 0.5, torch.full((len(coords), 2), 0.5), torch.ones(len(coords), 1)], 1)
    mesh, report = textured_mesh(Mesh.from_numpy(s.vertices, f), coords, attrs, res, decimation_target=1000,
                                 texture_size=128, repair_options=dict(max_hole_perimeter=0.1))
    assert report.repair.holes_filled == 1 and report.repair.faces_flipped > 0
    assert report.faces_out <= 1000 and set(report.seconds) == {"repair", "decimate", "unwrap", "bake"}
    path = export_glb(mesh, tmp_path / "chain.glb")
    rep = validate(path)
    assert rep["issues"]["numErrors"] == 0, _errors(rep)
    geom = trimesh.load(path, force="mesh")
    assert geom.is_winding_consistent and geom.volume > 0                # outward in the GLB (Y-up) too
    assert geom.visual.material.baseColorTexture.size == (128, 128)
    # colour follows the 3D ramp: engine p = (x, -z, y) of the glTF vertex; r = x + 0.5 at each vertex
    uv = np.asarray(geom.visual.uv)
    px = np.clip((uv[:, 0] * 128).astype(int), 0, 127)
    py = np.clip(((1 - uv[:, 1]) * 128).astype(int), 0, 127)
    tex = np.asarray(geom.visual.material.baseColorTexture.convert("RGBA")).astype(np.float64) / 255
    red = tex[py, px, 0]
    assert np.median(np.abs(red - (np.asarray(geom.vertices)[:, 0] + 0.5))) < 0.03


def test_read_mesh_gives_back_what_export_wrote(tmp_path):
    """read_mesh (the Load Mesh node's reader) returns the exported vertices, faces and glTF-convention UVs."""
    from trellis2.trellis2_core.mesh.load import read_mesh

    mesh = _textured_mesh()  # glTF Y-up already
    back = read_mesh(export_glb(mesh, tmp_path / "m.glb"))
    assert torch.allclose(back.vertices, mesh.vertices) and torch.equal(back.faces, mesh.faces)
    assert back.uvs is not None and torch.allclose(back.uvs, mesh.uvs)
    (tmp_path / "broken.glb").write_bytes(b"glTF not really")
    with pytest.raises(InputError, match="mesh_file: trimesh could not read 'broken.glb'"):
        read_mesh(tmp_path / "broken.glb", what="mesh_file")
