"""Texture baking against analytic fields, the UV rasteriser, seam filling and closest-point projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.bake import AttributeLayout, bake_textures, fill_outside
from trellis2.trellis2_core.mesh.closest import ClosestPointQuery, closest_on_triangles
from trellis2.trellis2_core.mesh.mesh import Mesh
from trellis2.trellis2_core.mesh.raster import rasterize_uv
from trellis2.trellis2_core.ovoxel.attributes import VoxelAttributeField

R = 32


def _gradient_field(device="cpu", alpha=1.0, metallic=0.2, roughness=0.75):
    """Dense R^3 voxels whose base colour is the linear ramp rgb = p + 0.5 of the voxel centre (engine frame)."""
    c = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rgb = (c.float() + 0.5) / R
    n = len(c)
    attrs = torch.cat([rgb, torch.full((n, 1), metallic), torch.full((n, 1), roughness), torch.full((n, 1), alpha)], 1)
    return VoxelAttributeField(c.to(device), attrs.to(device))


def _quad():
    """A square in the plane z = 0.1 spanning [-0.3, 0.3]^2, with u = x mapped to [0, 1] and v = y."""
    v = torch.tensor([[-0.3, -0.3, 0.1], [0.3, -0.3, 0.1], [0.3, 0.3, 0.1], [-0.3, 0.3, 0.1]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return Mesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]]), uvs=uv)


def test_gradient_lands_where_the_uvs_say():
    size = 64
    maps = bake_textures(_quad(), _gradient_field(), R, texture_size=size)
    bc = maps.base_color.astype(np.float64) / 255
    centres = (np.arange(size) + 0.5) / size                       # texel centres in uv
    x = -0.3 + 0.6 * centres                                       # u -> x, v (rows) -> y
    expect_r = np.broadcast_to(x[None, :] + 0.5, (size, size))
    expect_g = np.broadcast_to(x[:, None] + 0.5, (size, size))
    assert np.abs(bc[..., 0] - expect_r).max() <= 0.6 / 255 + 1e-9
    assert np.abs(bc[..., 1] - expect_g).max() <= 0.6 / 255 + 1e-9
    assert np.abs(bc[..., 2] - 0.6).max() <= 0.6 / 255 + 1e-9       # z = 0.1 -> 0.6
    assert (maps.base_color[..., 3] == 255).all()
    mr = maps.metallic_roughness
    assert (mr[..., 0] == 0).all() and (mr[..., 1] == round(0.75 * 255)).all()
    assert (mr[..., 2] == round(0.2 * 255)).all()
    assert not maps.uses_alpha


def test_gradient_on_an_unwrapped_sphere():
    pytest.importorskip("xatlas", reason="UV unwrap backend 'xatlas' not installed")
    from trellis2.trellis2_core.mesh.uv import unwrap

    s = trimesh.creation.icosphere(subdivisions=3, radius=0.35)
    mesh = unwrap(Mesh.from_numpy(s.vertices, s.faces), texture_size=256)
    maps = bake_textures(mesh, _gradient_field(alpha=0.5), R, texture_size=256)
    # random surface points: uv -> texel (nearest), compare to the analytic colour of the 3D point
    gen = np.random.default_rng(0)
    fid = gen.integers(0, mesh.num_faces, 2000)
    w = gen.dirichlet([4, 4, 4], 2000)                             # away from edges: texel centres stay inside
    tri = mesh.faces.numpy()[fid]
    p = (mesh.vertices.numpy()[tri] * w[..., None]).sum(1)
    uv = (mesh.uvs.numpy()[tri] * w[..., None]).sum(1)
    col = np.clip((uv * 256).astype(int), 0, 255)
    got = maps.base_color[col[:, 1], col[:, 0], :3].astype(np.float64) / 255
    err = np.abs(got - (p + 0.5))
    assert err.mean() < 0.01 and err.max() < 0.05, (err.mean(), err.max())
    assert maps.uses_alpha and abs(int(maps.base_color[..., 3].mean()) - 128) <= 1
    assert maps.base_color.shape == (256, 256, 4) and maps.metallic_roughness.shape == (256, 256, 3)


def test_reference_projection_samples_the_reference_surface():
    quad = _quad()
    lifted = quad.replace(vertices=quad.vertices + torch.tensor([0.0, 0.0, 0.2]))  # z = 0.3, reference at z = 0.1
    ref = Mesh(quad.vertices, quad.faces)
    maps = bake_textures(lifted, _gradient_field(), R, texture_size=16, reference=ref)
    assert np.abs(maps.base_color[..., 2].astype(np.float64) / 255 - 0.6).max() <= 0.6 / 255 + 1e-9
    unprojected = bake_textures(lifted, _gradient_field(), R, texture_size=16)
    assert np.abs(unprojected.base_color[..., 2].astype(np.float64) / 255 - 0.8).max() <= 0.6 / 255 + 1e-9


def test_rasteriser_chunk_invariance_big_triangles_and_coverage():
    quad = _quad()
    f1, b1 = rasterize_uv(quad.uvs, quad.faces, 40, 40)
    f2, b2 = rasterize_uv(quad.uvs, quad.faces, 40, 40, chunk=7)  # every face is "big": banded path
    assert torch.equal(f1, f2) and torch.allclose(b1, b2)
    assert (f1 >= 0).all()                                         # the quad covers the texture without cracks
    torch.testing.assert_close(b1.sum(1), torch.ones(1600))
    # a half-covered texture: texels below the diagonal u + v < 1 only
    f3, _ = rasterize_uv(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0, 1, 2]]), 10, 10)
    ij = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij"), -1).reshape(-1, 2)
    inside = ((ij[:, 0] + 0.5) + (ij[:, 1] + 0.5)) <= 10
    assert torch.equal(f3 >= 0, inside)


def test_fill_outside_keeps_covered_texels_and_leaves_no_black():
    img = torch.zeros(32, 32, 3)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:8, 4:8] = True
    img[4:8, 4:8] = torch.tensor([0.2, 0.4, 0.6])
    img[20, 25] = torch.tensor([1.0, 1.0, 1.0])
    mask[20, 25] = True
    out = fill_outside(img, mask, dilation=2)
    assert torch.equal(out[mask], img[mask])
    assert (out.sum(-1) > 0).all()
    torch.testing.assert_close(out[3, 5], torch.tensor([0.2, 0.4, 0.6]))  # first dilation ring copies its chart


def test_closest_point_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    tri = torch.randn(300, 3, 3, generator=gen)
    p = torch.randn(300, 3, generator=gen) * 2
    q = closest_on_triangles(p, tri)
    n = 60
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = (i + j) <= n
    u, v = (i[keep] / n).float(), (j[keep] / n).float()
    w = torch.stack([1 - u - v, u, v], 1)                                   # [S, 3] barycentric samples
    pts = torch.einsum("sk,tkc->tsc", w, tri)
    brute = ((pts - p[:, None]) ** 2).sum(-1).min(1).values.sqrt()
    got = ((q - p) ** 2).sum(-1).sqrt()
    assert (got <= brute + 1e-5).all() and (brute - got).max() < 0.05
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    query = ClosestPointQuery(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces))
    out = query.query(torch.tensor([[0.0, 0.0, 0.5], [0.1, 0.0, 0.0]]))
    assert torch.allclose(out.norm(dim=1), torch.tensor([0.3, 0.3]), atol=3e-3)


def test_bake_errors_and_determinism():
    with pytest.raises(InputError, match="uvs"):
        bake_textures(_quad().replace(uvs=None), _gradient_field(), R)
    small = VoxelAttributeField(torch.tensor([[1, 1, 1]]), torch.zeros(1, 3))
    with pytest.raises(InputError, match="channels"):
        bake_textures(_quad(), small, R, texture_size=8)
    with pytest.raises(InputError, match="texture_size"):
        bake_textures(_quad(), _gradient_field(), R, texture_size=0)
    rgb_only = AttributeLayout(base_color=(0, 3), metallic=3, roughness=4, alpha=None)
    a = bake_textures(_quad(), _gradient_field(alpha=0.3), R, texture_size=16, layout=rgb_only)
    b = bake_textures(_quad(), _gradient_field(alpha=0.3), R, texture_size=16, layout=rgb_only)
    assert (a.base_color[..., 3] == 255).all()                     # alpha channel ignored -> opaque
    assert np.array_equal(a.base_color, b.base_color) and np.array_equal(a.metallic_roughness, b.metallic_roughness)


@pytest.mark.cuda
def test_cuda_bake_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.35)
    v = torch.tensor(s.vertices, dtype=torch.float32)
    f = torch.tensor(s.faces)
    uv = torch.stack([v[:, 0] + 0.5, v[:, 1] + 0.5], 1) * 0.9 + 0.05               # planar layout (overlaps: fine)
    mesh = Mesh(v, f, uvs=uv)
    cpu = bake_textures(mesh, _gradient_field(), R, texture_size=128, reference=Mesh(v, f))
    gpu = bake_textures(mesh.to("cuda"), _gradient_field("cuda"), R, texture_size=128, reference=Mesh(v, f).to("cuda"))
    assert np.abs(cpu.base_color.astype(int) - gpu.base_color.astype(int)).max() <= 1
    assert np.abs(cpu.metallic_roughness.astype(int) - gpu.metallic_roughness.astype(int)).max() <= 1
