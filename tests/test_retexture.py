"""Retexturing a user's mesh (SPEC 16) on the tiny texturing snapshot: geometry untouched, UVs kept, frames right.

The user meshes sit far from the origin at an odd scale, Y-up (glTF), with several disconnected parts, open
boundaries, a zero-area face and a stray unreferenced vertex. Resolution 64 and 2 sampler steps keep it fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from trellis2.trellis2_core.errors import ConfigError, InputError
from trellis2.trellis2_core.mesh.glb import export_glb
from trellis2.trellis2_core.mesh.mesh import Mesh
from trellis2.trellis2_core.ovoxel.ovoxel import OVoxel
from trellis2.trellis2_core.ovoxel.voxelize import mesh_to_flexible_dual_grid
from trellis2.trellis2_core.pipeline import Trellis2Pipeline, rng
from trellis2.trellis2_core.pipeline.retexture import (
    MeshNormalization, bake_onto_mesh, decode_on_mesh, encode_mesh, retexture_mesh,
)  # fmt: skip
from trellis2.trellis2_core.sparse import SparseTensor
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

R = 64
FAST = {"steps": 2}
JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("snapshot") / "tiny")


@pytest.fixture(scope="module")
def pipe(snapshot):
    return Trellis2Pipeline.from_pretrained(snapshot, device="cpu", allow_download=False, config_file="texturing_pipeline.json")


def _image(shift: int = 0) -> Image.Image:
    rgba = np.zeros((96, 80, 4), np.uint8)
    rgba[20 + shift:70, 15:60 - shift] = (200, 60 + 3 * shift, 30, 255)
    rgba[30:40, 20:50, :3] = (20, 180, 90)
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def image():
    return _image()


def user_mesh(with_uvs: bool = False) -> Mesh:
    """Open box (no lid) + a separate quad + a closed tetrahedron, a zero-area face and a stray vertex; Y-up."""
    box = trimesh.creation.box(extents=(2.0, 1.0, 3.0))
    up = box.face_normals[:, 1] > 0.5
    parts = [(np.asarray(box.vertices), np.asarray(box.faces)[~up])]  # drop the +Y lid: an open boundary
    parts.append((np.array([[1.5, -0.5, -1.5], [3.0, -0.5, -1.5], [3.0, 0.7, 1.5], [1.5, 0.7, 1.5]]), np.array([[0, 1, 2], [0, 2, 3]])))
    tet = np.array([[-2.5, 0, 0], [-1.5, 0, 0], [-2.0, 0, 1.0], [-2.0, 1.0, 0.5]])
    parts.append((tet, np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])))
    verts, faces, n = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + n)
        n += len(v)
    faces.append(np.array([[0, 0, 1]]))  # zero-area face
    verts.append(np.array([[500.0, 500.0, 500.0]]))  # unreferenced stray vertex
    v = np.concatenate(verts) * 7.3 + np.array([100.0, -40.0, 12.0])
    f = np.concatenate(faces)
    uvs = None
    if with_uvs:  # a planar projection: overlapping but inside [0, 1]
        lo, hi = v[:-1].min(0), v[:-1].max(0)
        uvs = np.clip((v[:, [0, 2]] - lo[[0, 2]]) / (hi - lo)[[0, 2]], 0, 1)
    return Mesh.from_numpy(v, f, uvs=uvs)


@pytest.fixture(scope="module")
def unwrapped(pipe, image):
    mesh = user_mesh()
    return mesh, pipe.retexture(mesh, image, seed=1, resolution=R, texture_size=128, keep_uvs=True, sampler_overrides=FAST)


def test_geometry_is_returned_unchanged_after_unwrap(unwrapped):
    mesh, out = unwrapped  # no UVs: keep_uvs=True falls back to unwrapping
    res, vmap, n = out.mesh, out.vertex_map, mesh.num_vertices
    assert res.num_vertices > n  # seams duplicate vertices...
    assert torch.equal(res.vertices[:n], mesh.vertices)  # ...but every user vertex keeps its row, bitwise
    assert torch.equal(res.vertices, mesh.vertices[vmap])
    assert torch.equal(vmap[:n], torch.arange(n))
    assert torch.equal(vmap[res.faces], mesh.faces)  # same faces, same order, same corners
    assert res.uvs is not None and float(res.uvs.min()) >= 0 and float(res.uvs.max()) <= 1
    assert torch.allclose(res.normals.norm(dim=1), torch.ones(res.num_vertices), atol=1e-5)
    # textures: full PBR maps with content
    assert res.maps.base_color.shape == (128, 128, 4) and res.maps.metallic_roughness.shape == (128, 128, 3)
    assert res.maps.base_color[..., :3].std() > 0
    # the PBR voxels are the voxelised user mesh in the normalised engine frame
    norm = out.normalization
    coords, offset, flags = mesh_to_flexible_dual_grid(norm.to_engine(mesh.vertices), mesh.faces, R)
    assert torch.equal(out.ovoxel.coords, coords) and torch.equal(out.ovoxel.edge_flags, flags)
    assert out.ovoxel.attributes.shape == (coords.shape[0], 6) and torch.isfinite(out.ovoxel.attributes).all()


@pytest.fixture(scope="module")
def run(pipe, image):
    """The staged function on a precomputed conditioning of ``image`` (skips re-encoding it every call)."""
    cond = pipe.condition(image, (512,))

    def run(mesh: Mesh, seed: int, keep_uvs: bool = True, should_stop=None):
        return retexture_mesh(
            pipe.components, cond, mesh, resolution=R, params=pipe.sampler_params("tex_slat", **FAST),
            shape_normalization=pipe.files.normalizations["shape_slat_normalization"],
            tex_normalization=pipe.files.normalizations["tex_slat_normalization"],
            generator=rng.generator(seed), texture_size=64, keep_uvs=keep_uvs, should_stop=should_stop,
        )  # fmt: skip

    return run


def test_uvs_are_kept_when_asked_and_the_result_is_deterministic(pipe, image, run):
    mesh = user_mesh(with_uvs=True)
    a = pipe.retexture(mesh, image, seed=4, resolution=R, texture_size=64, keep_uvs=True, sampler_overrides=FAST)
    assert a.mesh.vertices is mesh.vertices and a.mesh.faces is mesh.faces and a.mesh.uvs is mesh.uvs
    assert torch.equal(a.vertex_map, torch.arange(mesh.num_vertices))
    # the staged function with the same conditioning and seed: bitwise the same (one random stream, no hidden state)
    b = run(mesh, 4)
    assert np.array_equal(a.mesh.maps.base_color, b.mesh.maps.base_color)
    assert np.array_equal(a.mesh.maps.metallic_roughness, b.mesh.maps.metallic_roughness)
    assert torch.equal(a.material.latent.feats, b.material.latent.feats)
    c = run(mesh, 5)
    assert not torch.equal(a.material.latent.feats, c.material.latent.feats)
    # keep_uvs=False replaces the user's UVs with a fresh atlas, geometry still kept
    d = run(mesh, 4, keep_uvs=False)
    assert torch.equal(d.mesh.vertices[: mesh.num_vertices], mesh.vertices)
    assert torch.equal(d.vertex_map[d.mesh.faces], mesh.faces)
    assert not torch.equal(d.mesh.uvs[: mesh.num_vertices], mesh.uvs)
    assert torch.equal(d.material.latent.feats, a.material.latent.feats)  # only the bake differs


def test_texels_sample_the_voxels_through_the_user_to_engine_map():
    """A tilted quad in the user frame and voxels whose colour = engine position + 0.5: every texel must read
    the engine position of its user-frame point (normalisation, Y-up -> Z-up swap, UV convention)."""
    p0, du, dv = np.array([3.0, 5.0, -2.0]), np.array([4.0, 2.0, 0.0]), np.array([0.0, 1.0, 4.0])
    v = np.stack([p0, p0 + du, p0 + du + dv, p0 + dv])
    mesh = Mesh.from_numpy(v, [[0, 1, 2], [0, 2, 3]], uvs=[[0, 0], [1, 0], [1, 1], [0, 1]])
    norm = MeshNormalization.of(mesh.vertices, mesh.faces)
    n = 16
    grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3).int()
    centre = (grid.float() + 0.5) / n - 0.5
    attrs = torch.cat([centre + 0.5, torch.full((len(grid), 1), 0.25), torch.full((len(grid), 1), 0.75),
                       torch.ones(len(grid), 1)], 1)  # fmt: skip
    ov = OVoxel(grid, n, torch.full((len(grid), 3), 0.5), torch.zeros(len(grid), 3, dtype=torch.bool), attributes=attrs)
    out, vmap = bake_onto_mesh(mesh, ov, norm, texture_size=32, keep_uvs=True)
    assert out.vertices is mesh.vertices and torch.equal(vmap, torch.arange(4))
    t = (np.arange(32) + 0.5) / 32
    u, w = np.meshgrid(t, t, indexing="xy")  # texel (row i, column j): u = column, v = row (glTF, v down)
    user_pts = p0 + u[..., None] * du + w[..., None] * dv
    expected = norm.to_engine(torch.from_numpy(user_pts)).numpy() + 0.5
    inside = (np.abs(expected - 0.5) < 0.5 - 1.0 / n).all(-1)  # all 8 trilinear corners exist: exact for a linear field
    assert inside.sum() > 200
    got = out.maps.base_color[..., :3].astype(np.float64) / 255
    np.testing.assert_allclose(got[inside], expected[inside], atol=0.6 / 255)
    assert (out.maps.metallic_roughness[..., 1] == 191).all() and (out.maps.metallic_roughness[..., 2] == 64).all()
    # the engine frame is Z-up: the user's +Y (up) is the engine's +Z
    e = norm.to_engine(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose((e[1] - e[0]) / norm.scale, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_normalisation_fills_the_cube_and_inverts():
    mesh = user_mesh()
    norm = MeshNormalization.of(mesh.vertices, mesh.faces)
    used = mesh.vertices[:-1]  # the stray vertex is not part of the object: it does not shrink it
    eng = norm.to_engine(used)
    assert float(eng.abs().max()) <= 0.5
    assert abs(float((eng.max(0).values - eng.min(0).values).max()) - 0.99999) < 1e-9
    assert torch.allclose(eng.max(0).values + eng.min(0).values, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(norm.to_user(eng), used.double(), atol=1e-9)


def test_encoder_latent_is_on_the_coarse_grid_and_decodes_onto_the_mesh_voxels(pipe):
    enc = encode_mesh(pipe.components, user_mesh(), R)
    geo, lat = enc.geometry, enc.shape.latent
    assert enc.shape.resolution == R and lat.feats.shape[1] == 32
    assert int(lat.coords[:, 1:].max()) < R // 16 and int(lat.coords[:, 1:].min()) >= 0
    parents = {tuple(c) for c in torch.unique(geo.coords // 16, dim=0).tolist()}
    assert parents == {tuple(c) for c in lat.coords[:, 1:].tolist()}  # every latent voxel covers mesh voxels
    assert float(geo.vertex_offset.min()) >= 0 and float(geo.vertex_offset.max()) <= 1 and geo.edge_flags.any()


def test_voxelised_sphere_fields_lie_on_the_sphere(pipe):
    """Analytic mesh: a sphere of radius 3 at (5, 1, -2) becomes the radius-0.499995 sphere of the engine frame;
    its dual vertices lie on it (to the tessellation's sag plus a fraction of a voxel) and its voxels are a shell."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=3.0)
    mesh = Mesh.from_numpy(np.asarray(sphere.vertices) + [5.0, 1.0, -2.0], sphere.faces)
    enc = encode_mesh(pipe.components, mesh, R)
    geo = enc.geometry
    dual = (geo.coords.double() + geo.vertex_offset.double()) / R - 0.5
    radius = 0.99999 / 2
    assert float((dual.norm(dim=1) - radius).abs().max()) < 0.5 / R
    centres = (geo.coords.double() + 0.5) / R - 0.5
    assert float((centres.norm(dim=1) - radius).abs().max()) < 0.9 / R  # a thin shell around the surface
    assert geo.num_voxels > 4 * np.pi * (radius * R) ** 2 * 0.8  # it covers the whole surface
    # edge flags: exactly the grid edges the surface crosses (sign change of |p| - r along the edge)
    for axis in range(3):
        a = (geo.coords.double() + 1) / R - 0.5  # max corner in the two other axes
        b = a.clone()
        a[:, axis] -= 1.0 / R
        crosses = (a.norm(dim=1) - radius).sign() != (b.norm(dim=1) - radius).sign()
        agree = (crosses == geo.edge_flags[:, axis]).double().mean()
        assert agree > 0.99, (axis, agree)  # the tessellated sphere differs from the true one near tangencies


def test_views_reach_the_texture_flow(pipe, image, run):
    mesh = user_mesh(with_uvs=True)
    kw = dict(seed=2, resolution=R, texture_size=32, sampler_overrides=FAST)
    one = pipe.retexture(mesh, [image], **kw)  # a list of one view is the single-image path
    assert torch.equal(one.material.latent.feats, run(mesh, 2).material.latent.feats)
    two = pipe.retexture(mesh, [image, _image(6)], multiview_mode="average", **kw)
    assert not torch.equal(one.material.latent.feats, two.material.latent.feats)
    assert torch.isfinite(two.ovoxel.attributes).all() and two.mesh.maps is not None


def test_device_spelled_without_index_keeps_the_encoder_records(snapshot, image):
    """torch.device("cpu:0") != the "cpu" its tensors report, exactly like "cuda" vs "cuda:0": moving the latent
    'to' the pipeline's device must not drop the records the texture decoder retraces."""
    pipe0 = Trellis2Pipeline.from_pretrained(snapshot, device="cpu:0", allow_download=False,
                                             config_file="texturing_pipeline.json")  # fmt: skip
    out = pipe0.retexture(user_mesh(with_uvs=True), image, seed=1, resolution=32, texture_size=32, sampler_overrides=FAST)
    assert out.ovoxel.attributes is not None and out.ovoxel.num_voxels > 0


def test_retextured_glb_validates_and_round_trips(unwrapped, tmp_path):
    mesh, out = unwrapped
    path = export_glb(out.mesh, tmp_path / "retextured.glb", double_sided=True)
    node = shutil.which("node")
    if node is not None and (JS / "node_modules" / "gltf-validator").is_dir():
        r = subprocess.run([node, str(JS / "validate.js"), str(path)], capture_output=True, text=True, timeout=120)
        report = json.loads(r.stdout)[0]
        errors = [m for m in report["issues"]["messages"] if m["severity"] == 0]
        assert report["issues"]["numErrors"] == 0, errors
    scene = trimesh.load(path, force="scene")
    (geom,) = scene.geometry.values()
    np.testing.assert_array_equal(np.asarray(geom.vertices, np.float32), out.mesh.vertices.numpy())  # user frame
    np.testing.assert_array_equal(np.asarray(geom.faces), out.mesh.faces.numpy())
    mat = geom.visual.material
    np.testing.assert_array_equal(np.asarray(mat.baseColorTexture.convert("RGBA")), out.mesh.maps.base_color)


def test_bad_inputs_raise_clear_errors(pipe, image, snapshot, run):
    mesh = user_mesh()
    with pytest.raises(InputError, match="multiple of 16"):
        pipe.retexture(mesh, image, resolution=100)
    with pytest.raises(InputError, match="no faces"):
        pipe.retexture(Mesh(mesh.vertices, torch.zeros(0, 3, dtype=torch.int64)), image, resolution=R)
    nan = mesh.vertices.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        pipe.retexture(Mesh(nan, mesh.faces), image, resolution=R)
    tiled = user_mesh(with_uvs=True)
    tiled = tiled.replace(uvs=tiled.uvs * 3)
    ov = OVoxel(torch.zeros(1, 3, dtype=torch.int32), R, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool),
                attributes=torch.zeros(1, 6))  # fmt: skip
    with pytest.raises(InputError, match="keep_uvs=False"):
        bake_onto_mesh(tiled, ov, MeshNormalization.of(tiled.vertices, tiled.faces), keep_uvs=True)
    with pytest.raises(InputError, match="no PBR attributes"):
        bake_onto_mesh(mesh, ov.with_attributes(None), MeshNormalization.of(mesh.vertices, mesh.faces))
    flat = Mesh(torch.ones(3, 3), torch.tensor([[0, 1, 2]]))
    with pytest.raises(InputError, match="zero bounding box"):
        pipe.retexture(flat, image, resolution=R)
    enc = encode_mesh(pipe.components, mesh, 32)
    mat = run(mesh, 0).material  # sampled on another encoding of the mesh (R = 64): its records do not fit
    with pytest.raises(InputError, match="not sampled on this mesh"):
        decode_on_mesh(pipe.components, mat, enc)
    rebuilt = dataclasses.replace(mat, latent=SparseTensor(mat.latent.feats, mat.latent.coords))  # records lost
    with pytest.raises(InputError, match="no longer carries"):
        decode_on_mesh(pipe.components, rebuilt, enc)
    full = Trellis2Pipeline.from_pretrained(snapshot, device="cpu", allow_download=False)  # pipeline.json: no encoder
    with pytest.raises(InputError, match="texturing_pipeline.json"):
        full.retexture(mesh, image, resolution=R)
    with pytest.raises(ConfigError, match="has no sparse_structure_sampler entry"):  # not a bare KeyError
        pipe.generate(image, pipeline_type="512")



def test_should_stop_reaches_every_stage_down_to_the_bake(run):
    """retexture_mesh polls should_stop through sampling, the decode, the unwrap and into the bake: stopping at the
    k-th poll raises Interrupted naming that stage, for every k, and the user's mesh is left untouched."""
    from test_mesh_cancel import _messages_of_every_poll

    mesh = user_mesh()
    before = (mesh.vertices.clone(), mesh.faces.clone())
    messages = _messages_of_every_poll(lambda stop: run(mesh, seed=2, keep_uvs=False, should_stop=stop))
    assert len(messages) >= 2 + 3  # both sampler steps, the decode, the unwrap, the bake
    text = " | ".join(messages)
    assert "sampling" in text and "decod" in text and "unwrap" in text and "bake" in text, messages
    assert torch.equal(mesh.vertices, before[0]) and torch.equal(mesh.faces, before[1])
    assert run(mesh, seed=2, keep_uvs=False, should_stop=lambda: False).mesh.maps.base_color.shape == (64, 64, 4)
