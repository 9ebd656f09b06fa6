"""The Mesh dataclass: validation messages, frame change (engine Z-up -> glTF Y-up), normals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.mesh import Mesh, PBRMaps, mesh_zup_to_yup, vertex_normals, yup_to_zup, zup_to_yup


def test_frame_change_is_a_rotation_and_inverts():
    p = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    q = zup_to_yup(p)
    torch.testing.assert_close(q[:, 1], p[:, 2])                     # engine up (z) becomes glTF up (y)
    torch.testing.assert_close(yup_to_zup(q), p)
    m = zup_to_yup(torch.eye(3))
    assert torch.linalg.det(m).item() == pytest.approx(1.0)          # proper rotation: winding/outwardness kept
    s = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    mesh = Mesh.from_numpy(s.vertices, s.faces)
    mesh = mesh.replace(normals=vertex_normals(mesh.vertices, mesh.faces))
    y = mesh_zup_to_yup(mesh)
    assert trimesh.Trimesh(y.vertices.numpy(), y.faces.numpy(), process=False).volume > 0
    torch.testing.assert_close(y.normals, torch.nn.functional.normalize(y.vertices, dim=1), atol=0.03, rtol=0)


def test_validation_names_the_field_and_the_fix():
    v = torch.zeros(3, 3)
    f = torch.tensor([[0, 1, 2]])
    with pytest.raises(InputError, match="Mesh.vertices.*float32"):
        Mesh(v.double(), f)
    with pytest.raises(InputError, match="Mesh.faces.*int64"):
        Mesh(v, f.int())
    with pytest.raises(InputError, match=r"indices must lie in \[0, 3\)"):
        Mesh(v, torch.tensor([[0, 1, 3]]))
    with pytest.raises(InputError, match="Mesh.uvs"):
        Mesh(v, f, uvs=torch.zeros(2, 2))
    maps = PBRMaps(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="unwrap first"):
        Mesh(v, f, maps=maps)
    with pytest.raises(InputError, match="base_color"):
        PBRMaps(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))
    m = Mesh.from_numpy(np.zeros((3, 3)), [[0, 1, 2]])
    assert m.vertices.dtype == torch.float32 and m.faces.dtype == torch.int64 and (m.num_vertices, m.num_faces) == (3, 1)
