"""bake_ovoxel: texture a mesh from an O-Voxel's PBR attributes (the UV-bake node's single engine call)."""

from __future__ import annotations

import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.mesh import Mesh
from trellis2.trellis2_core.mesh.postprocess import bake_ovoxel
from trellis2.trellis2_core.ovoxel import OVoxel, mesh_to_flexible_dual_grid

R = 32


@pytest.fixture(scope="module")
def sphere():
    tm = trimesh.creation.icosphere(subdivisions=3, radius=0.35)
    return Mesh.from_numpy(tm.vertices, tm.faces)


def _ovoxel(mesh: Mesh, rgb_of_xyz) -> OVoxel:
    coords, offset, flags = mesh_to_flexible_dual_grid(mesh.vertices, mesh.faces, R)
    ov = OVoxel(coords, R, offset.float(), flags)
    centres = ov.voxel_centers()
    rgb = rgb_of_xyz(centres)
    attrs = torch.cat([rgb, torch.full_like(rgb[:, :1], 0.25), torch.full_like(rgb[:, :1], 0.75), torch.ones_like(rgb[:, :1])], 1)
    return ov.with_attributes(attrs)


def test_uniform_attributes_bake_to_uniform_maps_and_geometry_is_unchanged(sphere):
    ov = _ovoxel(sphere, lambda p: torch.tensor([0.8, 0.4, 0.2]).expand(p.shape[0], 3))
    out = bake_ovoxel(sphere, ov, texture_size=128, project_to_surface=False)
    assert out.maps.base_color.shape == (128, 128, 4) and out.uvs is not None
    # geometry: the same surface (vertices may be split at UV seams, never moved)
    assert set(map(tuple, out.vertices.tolist())) == set(map(tuple, sphere.vertices.tolist()))
    bc = torch.from_numpy(out.maps.base_color).reshape(-1, 4).float()
    mr = torch.from_numpy(out.maps.metallic_roughness).reshape(-1, 3).float()
    # after seam filling every texel carries the field's constant values
    assert torch.allclose(bc[:, :3].median(0).values, torch.tensor([204.0, 102.0, 51.0]), atol=1)
    assert torch.allclose(mr[:, 1:].median(0).values, torch.tensor([191.0, 64.0]), atol=1)  # G roughness, B metallic


def test_colour_gradient_follows_the_surface(sphere):
    ov = _ovoxel(sphere, lambda p: (p[:, :1] + 0.5).clamp(0, 1).expand(-1, 3).contiguous())  # grey ramp along x
    out = bake_ovoxel(sphere, ov, texture_size=256, project_to_surface=True)
    # sample the texture at each vertex's UV: the red channel follows x
    uv = out.uvs
    px = (uv[:, 0] * 256).floor().long().clamp(0, 255)
    py = (uv[:, 1] * 256).floor().long().clamp(0, 255)  # glTF UVs: origin top-left, row = v * H
    red = torch.from_numpy(out.maps.base_color)[py, px, 0].float() / 255
    expected = (out.vertices[:, 0] + 0.5).clamp(0, 1)
    assert torch.corrcoef(torch.stack([red, expected]))[0, 1] > 0.95


def test_geometry_only_ovoxel_is_refused(sphere):
    coords, offset, flags = mesh_to_flexible_dual_grid(sphere.vertices, sphere.faces, R)
    with pytest.raises(InputError, match="no PBR attributes"):
        bake_ovoxel(sphere, OVoxel(coords, R, offset.float(), flags))
