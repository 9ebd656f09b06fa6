"""QEM decimation: face targets, boundary preservation, shape fidelity, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.decimate import decimate
from trellis2.trellis2_core.mesh.mesh import Mesh

pytest.importorskip("fast_simplification", reason="decimation backend 'fast-simplification' not installed")


def _sphere(subdiv=5, radius=0.4):
    s = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    return Mesh.from_numpy(s.vertices, s.faces)


def _boundary_vertices(mesh):
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)
    e = tm.edges_sorted
    uniq, counts = np.unique(e, axis=0, return_counts=True)
    return np.unique(uniq[counts == 1])


def test_reaches_target_and_keeps_the_shape():
    mesh = _sphere()                                              # 20480 faces
    out = decimate(mesh, 2000)
    assert 1800 <= out.num_faces <= 2000
    tm = trimesh.Trimesh(out.vertices.numpy(), out.faces.numpy(), process=False)
    assert tm.is_watertight
    r = np.linalg.norm(out.vertices.numpy(), axis=1)
    assert np.abs(r - 0.4).max() < 0.01                          # vertices stay on the sphere
    assert out.vertices.dtype == torch.float32 and out.faces.dtype == torch.int64
    assert int(out.faces.max()) < out.num_vertices and out.num_vertices == len(np.unique(out.faces.numpy()))


def test_open_boundary_is_kept_exactly():
    mesh = _sphere()
    v = mesh.vertices.numpy()
    keep = v[mesh.faces.numpy()].mean(1)[:, 2] > 0.1             # a cap: one open boundary loop
    cap = Mesh.from_numpy(v, mesh.faces.numpy()[keep])
    before = cap.vertices.numpy()[_boundary_vertices(cap)]
    out = decimate(cap, 600)
    assert out.num_faces <= 600
    after = out.vertices.numpy()[_boundary_vertices(out)]
    key = lambda a: a[np.lexsort(a.T)]  # noqa: E731
    assert len(after) == len(before) and np.array_equal(key(after), key(before))


def test_noop_deterministic_and_errors():
    mesh = _sphere(3)
    assert decimate(mesh, 10_000) is mesh                          # already under the target
    a, b = decimate(mesh, 500), decimate(mesh, 500)
    assert torch.equal(a.vertices, b.vertices) and torch.equal(a.faces, b.faces)
    for bad in (0, 3, 2.5, True, "100"):
        with pytest.raises(InputError, match="target_faces"):
            decimate(mesh, bad)
