"""Mesh repair on meshes with known defects and known counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.mesh.mesh import Mesh
from trellis2.trellis2_core.mesh.repair import RepairReport, repair_mesh


def _sphere(subdiv=3, radius=0.4, centre=(0, 0, 0)):
    s = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    return np.asarray(s.vertices, np.float32) + np.float32(centre), np.asarray(s.faces, np.int64)


def _tm(mesh):
    return trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)


def _broken_sphere():
    """An icosphere (642 v, 1280 f) with every defect, and the counts repair must report."""
    v, f = _sphere()
    hole_fan = (f == 0).any(1)                               # remove the 5 faces around vertex 0: a pentagon hole
    f = f[~hole_fan]
    soup_v = v[f].reshape(-1, 3)                              # duplicated vertices: every face has its own 3
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    flip = np.random.default_rng(0).random(len(soup_f)) < 0.4
    soup_f[flip] = soup_f[flip][:, ::-1]                      # random winding
    extra = np.array([[3, 3, 4],                              # repeated index
                      [0, 1, 1]])                             # repeated index
    speck_v, speck_f = _sphere(0, 0.002, (0.45, 0.0, 0.0))    # floating speck: 20 faces, area ~5e-5
    line = np.array([[0.9, 0, 0], [0.95, 0, 0], [1.0, 0, 0]], np.float32)  # 3 collinear points: zero area
    zero_area = np.arange(3)[None] + len(soup_v) + len(speck_v)
    dup = soup_f[[10, 11]][:, ::-1]                           # the same faces, either winding
    v_all = np.concatenate([soup_v, speck_v, line])
    f_all = np.concatenate([soup_f, extra, speck_f + len(soup_v), zero_area, dup])
    expected = dict(vertices_welded=len(soup_v) - (642 - 1), degenerate_faces=3, duplicate_faces=2,
                    components_removed=1, component_faces_removed=20, holes_filled=1, hole_faces_added=5)
    return Mesh.from_numpy(v_all, f_all), expected


def test_repair_reports_exact_counts_and_returns_a_closed_outward_sphere():
    mesh, expected = _broken_sphere()
    before = mesh.vertices.clone(), mesh.faces.clone()
    out, rep = repair_mesh(mesh, max_hole_perimeter=0.5, min_component_area=1e-3)
    for k, n in expected.items():
        assert getattr(rep, k) == n, (k, getattr(rep, k), n, str(rep))
    assert rep.faces_flipped > 0
    tm = _tm(out)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0                                       # outward
    assert abs(tm.volume - 4 / 3 * np.pi * 0.4 ** 3) / tm.volume < 0.02
    assert out.num_faces == 1280                               # 1275 kept + 5 fan faces (the fan centre is new)
    assert torch.equal(mesh.vertices, before[0]) and torch.equal(mesh.faces, before[1])  # input untouched


def test_each_step_can_be_switched_off():
    mesh, _ = _broken_sphere()
    out, rep = repair_mesh(mesh, weld_tolerance=None, remove_degenerate=False, remove_duplicates=False,
                           min_component_area=0, max_hole_perimeter=0, orient=False)
    assert rep == RepairReport(unreferenced_vertices=0)
    assert torch.equal(out.faces, mesh.faces) and torch.equal(out.vertices, mesh.vertices)


def test_small_holes_only_and_triangle_hole():
    v, f = _sphere()
    # perimeter of a one-face hole ~ 3 x 0.06: kept at the reference threshold 0.03, filled with 0.5
    _, rep = repair_mesh(Mesh.from_numpy(v, f[1:]))
    assert rep.holes_filled == 0
    out, rep = repair_mesh(Mesh.from_numpy(v, f[1:]), max_hole_perimeter=0.5)
    assert (rep.holes_filled, rep.hole_faces_added, out.num_vertices) == (1, 1, 642)
    assert _tm(out).is_watertight


def test_orientation_fixes_random_flips_outward_per_component():
    a_v, a_f = _sphere(2, 0.2, (-0.25, 0, 0))
    b_v, b_f = _sphere(2, 0.2, (0.25, 0, 0))
    v = np.concatenate([a_v, b_v])
    f = np.concatenate([a_f, b_f + len(a_v)])
    f = f.copy()
    f[len(a_f):] = f[len(a_f):, ::-1]                          # second sphere entirely inward
    flip = np.random.default_rng(1).random(len(f)) < 0.5
    f[flip] = f[flip][:, ::-1]
    out, rep = repair_mesh(Mesh.from_numpy(v, f))
    tm = _tm(out)
    assert tm.is_winding_consistent and tm.is_watertight
    for part in tm.split(only_watertight=False):
        assert part.volume > 0
    ref_dirs = np.asarray(trimesh.Trimesh(v, np.concatenate([a_f, b_f + len(a_v)]), process=False).face_normals)
    assert np.allclose(np.asarray(tm.face_normals), ref_dirs, atol=1e-5)  # same faces, all outward


def test_inner_shell_removed_only_when_asked_and_enclosed():
    outer_v, outer_f = _sphere(3, 0.4)
    inner_v, inner_f = _sphere(2, 0.2)
    side_v, side_f = _sphere(2, 0.05, (0.6, 0, 0))             # outside the big sphere: must stay
    v = np.concatenate([outer_v, inner_v, side_v])
    f = np.concatenate([outer_f, inner_f + len(outer_v), side_f + len(outer_v) + len(inner_v)])
    _, rep = repair_mesh(Mesh.from_numpy(v, f))
    assert rep.inner_shells_removed == 0
    out, rep = repair_mesh(Mesh.from_numpy(v, f), remove_inner=True)
    assert rep.inner_shells_removed == 1
    assert out.num_faces == len(outer_f) + len(side_f)


def test_repair_is_deterministic_and_validates_input():
    mesh, _ = _broken_sphere()
    a, ra = repair_mesh(mesh, max_hole_perimeter=0.5)
    b, rb = repair_mesh(mesh, max_hole_perimeter=0.5)
    assert ra == rb and torch.equal(a.vertices, b.vertices) and torch.equal(a.faces, b.faces)
    with pytest.raises(InputError, match="weld_tolerance"):
        repair_mesh(mesh, weld_tolerance=-1)
    with pytest.raises(InputError, match="Mesh"):
        repair_mesh((mesh.vertices, mesh.faces))


def test_one_face_holes_in_a_randomly_wound_mesh_close():
    # regression: before orientation runs, boundary edges of a 3-loop need not chain head to tail
    v, f = _sphere()
    rng = np.random.default_rng(3)
    for _ in range(5):
        ff = f[np.delete(np.arange(len(f)), rng.choice(len(f), 6, replace=False))].copy()
        flip = rng.random(len(ff)) < 0.5
        ff[flip] = ff[flip][:, ::-1]
        out, rep = repair_mesh(Mesh.from_numpy(v, ff), max_hole_perimeter=0.5)
        tm = _tm(out)
        assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0, str(rep)
        assert int(out.faces.min()) >= 0
