"""Tangent frames (glTF TANGENT with handedness) and the tangent-space normal-map bake, checked against a sphere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from test_mesh_glb import validate  # noqa: F401  (the Khronos validator fixture)
from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.bake import bake_textures
from trellis2.trellis2_core.mesh.glb import export_glb, glb_bytes
from trellis2.trellis2_core.mesh.mesh import Mesh, PBRMaps, face_normals, mesh_zup_to_yup
from trellis2.trellis2_core.mesh.normal_map import vertex_tangents, with_tangents
from trellis2.trellis2_core.mesh.raster import rasterize_uv
from trellis2.trellis2_core.ovoxel.attributes import VoxelAttributeField

R, SIZE, RADIUS = 16, 192, 0.35


def _field():
    c = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    attrs = torch.cat([(c.float() + 0.5) / R, torch.full((len(c), 3), 0.5)], 1)
    return VoxelAttributeField(c, attrs)


def _sphere(subdivisions, jitter=0.0):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=RADIUS)
    v = np.asarray(s.vertices)
    if jitter:  # radial jitter: tilted faces, vertex normals no longer radial
        v = v * (1 + jitter * np.random.default_rng(1).uniform(-1, 1, (len(v), 1)))
    return Mesh.from_numpy(v, s.faces)


@pytest.fixture(scope="module")
def reference():
    return _sphere(5)                                                     # 20480 faces: the "high-res surface"


def _unwrapped(jitter=0.0):
    pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
    from trellis2.trellis2_core.mesh.uv import unwrap

    return with_tangents(unwrap(_sphere(1, jitter), texture_size=SIZE))


def _decode_errors(mesh, normal_map, size=SIZE):
    """Per covered texel: angle (degrees) between the true sphere normal at the texel's 3D position and (baked map
    decoded in the interpolated TBN, low-poly face normal, interpolated low-poly vertex normal). Frames rebuilt here."""
    face, bary = rasterize_uv(mesh.uvs, mesh.faces, size, size)
    tex = torch.nonzero(face >= 0).squeeze(1)
    f, b = face[tex], bary[tex][..., None]
    fv = mesh.faces[f]
    p = (mesh.vertices[fv] * b).sum(1)
    n = F.normalize((mesh.normals[fv] * b).sum(1), dim=1)
    tan = mesh.tangents[fv]
    t = (tan[..., :3] * b).sum(1)
    t = F.normalize(t - n * (n * t).sum(1, keepdim=True), dim=1)
    w = torch.sign((tan[..., 3:] * b).sum(1))
    bt = w * torch.linalg.cross(n, t)
    m = torch.from_numpy(normal_map.reshape(-1, 3)[tex.numpy()]).float() / 255 * 2 - 1
    world = F.normalize(m[:, :1] * t + m[:, 1:2] * bt + m[:, 2:] * n, dim=1)
    truth = F.normalize(p, dim=1)
    deg = lambda a: torch.rad2deg(torch.acos((F.normalize(a, dim=1) * truth).sum(1).clamp(-1, 1)))  # noqa: E731
    return deg(world), deg(face_normals(mesh.vertices, mesh.faces)[f]), deg(n)


@pytest.mark.parametrize("jitter", [0.0, 0.12])
def test_baked_normals_match_the_sphere(reference, jitter):
    mesh = _unwrapped(jitter)
    maps = bake_textures(mesh, _field(), R, texture_size=SIZE, reference=reference, normal_map=True)
    assert maps.normal.shape == (SIZE, SIZE, 3) and maps.normal.dtype == np.uint8
    baked, flat, smooth = _decode_errors(mesh, maps.normal)
    print(f"jitter {jitter}: mean angular error baked {baked.mean():.2f} deg (max {baked.max():.2f}), "
          f"low-poly face normal {flat.mean():.2f}, interpolated low-poly vertex normal {smooth.mean():.2f}")
    assert baked.mean() < 3.0 and baked.max() < 10.0
    assert baked.mean() < flat.mean() / 3                                  # the flat low-poly surface: ~6-8 degrees
    if jitter:                                                              # on a perfect icosphere Phong normals are
        assert baked.mean() < smooth.mean() / 3                            # radial by symmetry; jittered they are not
    # unit normals everywhere (seam fill renormalises), and pointing outwards (blue > 0.5)
    dec = maps.normal.astype(np.float64) / 255 * 2 - 1
    assert np.abs(np.linalg.norm(dec, axis=-1) - 1).max() < 0.02 and (dec[..., 2] > 0).all()


def test_tangents_handedness_on_a_quad():
    """Image upright seen from +z (u = +x, glTF v = -y): w = +1; u flipped (mirrored): w = -1, T = -x."""
    v = torch.tensor([[-0.3, -0.3, 0.1], [0.3, -0.3, 0.1], [0.3, 0.3, 0.1], [-0.3, 0.3, 0.1]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.stack([(v[:, 0] + 0.3) / 0.6, (0.3 - v[:, 1]) / 0.6], 1)
    n = torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3).contiguous()
    t = vertex_tangents(v, f, uv, n)
    torch.testing.assert_close(t, torch.tensor([[1.0, 0, 0, 1]]).expand(4, 4))
    mirrored = torch.stack([1 - uv[:, 0], uv[:, 1]], 1)
    torch.testing.assert_close(vertex_tangents(v, f, mirrored, n), torch.tensor([[-1.0, 0, 0, -1]]).expand(4, 4))


def test_mirrored_charts_get_w_minus_one_and_still_decode(reference):
    mesh = _unwrapped(jitter=0.12)                 # jittered: the map is far from flat, so a wrong w would show
    # charts = faces connected through shared (seam-split) vertices; mirror u of every other chart in place
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    fa = mesh.faces.numpy()
    nv = mesh.num_vertices
    g = sp.coo_matrix((np.ones(2 * fa.size), (np.r_[fa[:, [0, 1, 2]].ravel(), fa[:, [1, 2, 0]].ravel()],
                                              np.r_[fa[:, [1, 2, 0]].ravel(), fa[:, [0, 1, 2]].ravel()])), (nv, nv))
    nchart, lab = connected_components(g, directed=False)
    assert nchart >= 2
    flip = torch.from_numpy(lab % 2 == 0)
    uv = mesh.uvs.clone()
    for c in range(0, nchart, 2):
        sel = torch.from_numpy(lab == c)
        u = uv[sel, 0]
        uv[sel, 0] = u.min() + u.max() - u
    before = mesh.tangents
    mirrored = with_tangents(mesh.replace(uvs=uv, tangents=None))
    after = mirrored.tangents
    assert torch.equal(after[flip, 3], -before[flip, 3]) and torch.equal(after[~flip, 3], before[~flip, 3])
    torch.testing.assert_close(after[flip, :3], -before[flip, :3], atol=1e-5, rtol=0)  # T = dP/du reverses
    assert (after[:, 3] == -1).any() and (after[:, 3] == 1).any()
    # every face's three corners agree on w (one handedness per chart)
    assert (after[mirrored.faces, 3].std(1) == 0).all()
    maps = bake_textures(mirrored, _field(), R, texture_size=SIZE, reference=reference, normal_map=True)
    baked, _, smooth = _decode_errors(mirrored, maps.normal)
    face, _ = rasterize_uv(mirrored.uvs, mirrored.faces, SIZE, SIZE)
    on_mirrored = after[mirrored.faces[face[face >= 0]], 3][:, 0] < 0
    assert on_mirrored.any() and (~on_mirrored).any()
    assert baked[on_mirrored].mean() < 3.0 and baked[~on_mirrored].mean() < 3.0
    assert baked.mean() < smooth.mean() / 3


def test_normal_map_off_changes_nothing(reference):
    mesh = _unwrapped()
    off = bake_textures(mesh, _field(), R, texture_size=64, reference=reference)
    on = bake_textures(mesh, _field(), R, texture_size=64, reference=reference, normal_map=True)
    assert off.normal is None and on.normal is not None
    assert np.array_equal(off.base_color, on.base_color)
    assert np.array_equal(off.metallic_roughness, on.metallic_roughness)
    plain = mesh.replace(tangents=None, maps=off)
    gltf = _json(glb_bytes(plain))
    assert "TANGENT" not in gltf["meshes"][0]["primitives"][0]["attributes"]
    assert "normalTexture" not in gltf["materials"][0]
    # without a reference the map is flat (the low-res surface is the high-res one)
    flat = bake_textures(mesh, _field(), R, texture_size=32, normal_map=True).normal
    assert (np.abs(flat.astype(int) - [128, 128, 255]) <= 1).all()


def test_glb_with_normal_map_validates_and_carries_tangents(tmp_path, reference, validate):  # noqa: F811
    mesh = _unwrapped()
    maps = bake_textures(mesh, _field(), R, texture_size=64, reference=reference, normal_map=True)
    out = mesh_zup_to_yup(mesh.replace(maps=maps))
    path = export_glb(out, tmp_path / "n.glb")
    report = validate(path)
    assert report["issues"]["numErrors"] == 0, [m for m in report["issues"]["messages"] if m["severity"] == 0]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    gltf = _json(path.read_bytes())
    prim = gltf["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "TANGENT", "TEXCOORD_0"} <= set(prim["attributes"])
    assert not any(k.startswith("_") for k in prim["attributes"])
    acc = gltf["accessors"][prim["attributes"]["TANGENT"]]
    assert acc["type"] == "VEC4" and acc["componentType"] == 5126 and acc["count"] == out.num_vertices
    assert "normalTexture" in gltf["materials"][0]
    # the file's tangents are the ones the map was baked in (rotated to Y-up, same w)
    tan = _accessor(path.read_bytes(), gltf, prim["attributes"]["TANGENT"]).reshape(-1, 4)
    np.testing.assert_allclose(tan, out.tangents.numpy(), atol=1e-6)
    torch.testing.assert_close(with_tangents(out.replace(tangents=None)).tangents, out.tangents, atol=1e-5, rtol=0)
    # the normal texture round-trips losslessly (PNG), rows not flipped
    mat = trimesh.load(path, force="mesh").visual.material
    assert np.array_equal(np.asarray(mat.normalTexture.convert("RGB")), maps.normal)
    # a mesh with a normal map but no stored tangents/normals: computed at export, still valid
    bare = out.replace(tangents=None, normals=None)
    report = validate(export_glb(bare, tmp_path / "bare.glb"))
    assert report["issues"]["numErrors"] == 0
    webp = export_glb(out, tmp_path / "w.glb", webp=True)                  # normalTexture as WebP too
    assert validate(webp)["issues"]["numErrors"] == 0
    assert "TANGENT" in _json(webp.read_bytes())["meshes"][0]["primitives"][0]["attributes"]


def test_chain_with_normal_map(tmp_path, validate):  # noqa: F811
    pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
    pytest.importorskip("fast_simplification", reason="decimation backend 'fast-simplification' not installed")
    from trellis2.trellis2_core.cli import _parser
    from trellis2.trellis2_core.mesh.postprocess import textured_mesh

    c = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    attrs = torch.cat([(c.float() + 0.5) / R, torch.full((len(c), 3), 0.5)], 1)
    full = _sphere(4)
    mesh, rep = textured_mesh(full, c, attrs, R, decimation_target=200, texture_size=64, normal_map=True)
    assert mesh.maps.normal is not None and mesh.tangents is not None and rep.faces_out <= 200
    # Y-up output: stored tangents equal a fresh computation in that frame (the frame change rotated them)
    torch.testing.assert_close(with_tangents(mesh.replace(tangents=None)).tangents, mesh.tangents, atol=1e-4,
                               rtol=0)
    assert validate(export_glb(mesh, tmp_path / "c.glb"))["issues"]["numErrors"] == 0
    plain, _ = textured_mesh(full, c, attrs, R, decimation_target=200, texture_size=64)
    assert plain.tangents is None and plain.maps.normal is None
    assert np.array_equal(plain.maps.base_color, mesh.maps.base_color)
    assert _parser().parse_args(["generate", "a.png", "-o", "b.glb", "--normal-map"]).normal_map is True
    assert _parser().parse_args(["generate", "a.png", "-o", "b.glb"]).normal_map is False


def test_bake_ovoxel_with_normal_map():
    """bake_ovoxel's reference is the O-Voxel's own decoded surface (dual grid at R = 32): its normals, not the
    low-poly ones, come out of the map."""
    pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
    from trellis2.trellis2_core.mesh.postprocess import bake_ovoxel
    from trellis2.trellis2_core.ovoxel import OVoxel, mesh_to_flexible_dual_grid

    dense = _sphere(3)
    coords, offset, flags = mesh_to_flexible_dual_grid(dense.vertices, dense.faces, 32)
    ov = OVoxel(coords, 32, offset.float(), flags)
    ov = ov.with_attributes(torch.full((len(coords), 6), 0.5))
    low = _sphere(1, jitter=0.12)
    out = bake_ovoxel(low, ov, texture_size=128, normal_map=True)
    assert out.tangents is not None and out.maps.normal.shape == (128, 128, 3)
    baked, _, smooth = _decode_errors(out, out.maps.normal, 128)
    print(f"bake_ovoxel: mean angular error baked {baked.mean():.2f} deg, low-poly vertex normal {smooth.mean():.2f}")
    assert baked.mean() < smooth.mean() / 2
    assert bake_ovoxel(low, ov, texture_size=32).maps.normal is None


def test_bad_inputs_are_named():
    bc, mr = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InputError, match="PBRMaps.normal"):
        PBRMaps(bc, mr, normal=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match="Mesh.tangents"):
        Mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), tangents=torch.zeros(3, 3))
    with pytest.raises(InputError, match="uvs"):
        with_tangents(Mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]])))


def _json(glb: bytes):
    n = int.from_bytes(glb[12:16], "little")
    return json.loads(glb[20:20 + n])


def _accessor(glb: bytes, gltf, index):
    n = int.from_bytes(glb[12:16], "little")
    binary = glb[20 + n + 8:]
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    comps = {"VEC4": 4, "VEC3": 3, "VEC2": 2, "SCALAR": 1}[acc["type"]]
    return np.frombuffer(binary, np.float32, acc["count"] * comps, start)

