"""Mesh repair: weld, drop degenerate/duplicate faces, remove small floaters and inner shells, fill holes, orient.

Each step is optional and counted in a RepairReport. The steps are local and conservative on purpose: whole-mesh
"make it manifold" tools (pymeshfix) have deleted 99% of TRELLIS meshes. Runs on CPU with numpy/scipy (topology is
index work; ~1-2 s per million faces on one core); the Mesh may live on any device and comes back on it.
Attributes: normals are dropped when faces change (recompute them); UVs follow welded vertices only if welding is off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, stop_if_asked
from .holes import fill_small_holes
from .mesh import Mesh
from .orient import orient_faces, remove_inner_shells
from .topology import compact, face_components, group_rows, triangle_areas, unique_rows_first

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What `repair_mesh` changed (counts; 0 for steps that were off)."""

    vertices_welded: int = 0        # vertices merged into another one
    degenerate_faces: int = 0       # faces with a repeated vertex or (near) zero area, removed
    duplicate_faces: int = 0        # faces over the same vertex set as an earlier face (either winding), removed
    components_removed: int = 0     # small floating components removed
    component_faces_removed: int = 0
    inner_shells_removed: int = 0   # components enclosed by a closed component, removed
    holes_filled: int = 0           # boundary loops closed
    hole_faces_added: int = 0
    faces_flipped: int = 0          # faces whose winding was reversed
    unreferenced_vertices: int = 0  # vertices no face used, removed

    def __str__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name))


def repair_mesh(
    mesh: Mesh,
    *,
    weld_tolerance: float | None = 1e-6,
    remove_degenerate: bool = True,
    degenerate_area: float = 1e-12,
    remove_duplicates: bool = True,
    min_component_faces: int = 0,
    min_component_area: float = 1e-5,
    remove_inner: bool = False,
    max_hole_perimeter: float = 0.03,
    orient: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Mesh, RepairReport]:
    """Repair `mesh`; returns (new mesh, report). The input is never modified.

    weld_tolerance: merge vertices closer than this (per-axis grid of that size; None = off, 0 = exact duplicates).
    remove_degenerate: drop faces with a repeated index or area <= degenerate_area.
    remove_duplicates: drop faces over an already seen vertex triple (either winding).
    min_component_faces / min_component_area: drop vertex-connected components with fewer faces or less total area
    (mesh units^2; SPEC 15's reference uses area < 1e-5 in the unit cube). 0 disables each test.
    remove_inner: drop components enclosed by another closed component (ray parity; skipped when too costly).
    max_hole_perimeter: fill simple boundary loops with perimeter <= this (mesh units; 0 = off; reference 0.03).
    orient: make winding consistent per component and outward (signed volume).
    Normals are recomputed by the caller if needed (dropped here when faces change); UVs are dropped if vertices
    are welded or added (re-unwrap after repair).
    should_stop: optional callable polled before each step; True raises ``Interrupted`` naming the next step (the
    input is untouched: every step works on copies).
    """
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a trellis2_core.mesh.Mesh, got {type(mesh).__name__}")
    if weld_tolerance is not None and weld_tolerance < 0:
        raise InputError(f"weld_tolerance: expected >= 0 or None (off), got {weld_tolerance}")
    rep = RepairReport()

    def check(step: str) -> None:
        stop_if_asked(should_stop, f"mesh repair interrupted before {step}")

    check("welding")
    device = mesh.vertices.device
    v = mesh.vertices.detach().cpu().numpy().astype(np.float32, copy=True)
    f = mesh.faces.detach().cpu().numpy().astype(np.int64, copy=True)
    uvs = None if mesh.uvs is None else mesh.uvs.detach().cpu().numpy()
    keep_uv = True

    if weld_tolerance is not None and len(v):
        q = np.round(v.astype(np.float64) / weld_tolerance).astype(np.int64) if weld_tolerance > 0 else \
            v.view(np.int32).astype(np.int64)  # exact: compare the float bits
        if weld_tolerance == 0:
            q[q == np.int64(np.float32(-0.0).view(np.int32))] = 0  # -0.0 == 0.0
        group = group_rows(q)
        rep.vertices_welded = int(len(v) - (group.max() + 1))
        if rep.vertices_welded:
            first = unique_rows_first(q)
            v = v[first][np.argsort(group[first])]  # representative = first occurrence, rows in group order
            f = group[f]
            keep_uv = False

    check("removing degenerate faces")
    if remove_degenerate and len(f):
        rep_idx = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
        bad = rep_idx | (triangle_areas(v, f) <= degenerate_area)
        rep.degenerate_faces = int(bad.sum())
        f = f[~bad]

    check("removing duplicate faces")
    if remove_duplicates and len(f):
        first = unique_rows_first(np.sort(f, axis=1))
        rep.duplicate_faces = int(len(f) - len(first))
        f = f[first]

    check("removing small components")
    if (min_component_faces > 0 or min_component_area > 0) and len(f):
        ncomp, lab = face_components(f, len(v))
        nfc = np.bincount(lab, minlength=ncomp)
        area = np.bincount(lab, weights=triangle_areas(v, f), minlength=ncomp)
        small = (nfc < min_component_faces) | (area < min_component_area)
        if small.all():  # never delete the whole mesh: keep the largest component
            small[np.argmax(area)] = False
        rep.components_removed = int(small.sum())
        rep.component_faces_removed = int(small[lab].sum())
        f = f[~small[lab]]

    check("removing inner shells")
    if remove_inner and len(f):
        f, rep.inner_shells_removed = remove_inner_shells(v, f)

    nv_before = len(v)
    v, f, uvs_kept, keep = compact(v, f, uvs if keep_uv else None)
    rep.unreferenced_vertices = int(nv_before - len(v))

    check("filling holes")
    if max_hole_perimeter and max_hole_perimeter > 0 and len(f):
        v, f, rep.holes_filled, rep.hole_faces_added = fill_small_holes(v, f, max_hole_perimeter)
        if rep.holes_filled and len(v) != len(keep):
            keep_uv = False

    check("orienting faces")
    if orient and len(f):
        f, rep.faces_flipped = orient_faces(v, f)

    changed = any(getattr(rep, fl.name) for fl in fields(rep))
    uv_out = None if not keep_uv or uvs_kept is None else torch.from_numpy(np.ascontiguousarray(uvs_kept)).to(device)
    out = Mesh(torch.from_numpy(v).to(device), torch.from_numpy(f).to(device),
               normals=mesh.normals if not changed else None, uvs=uv_out)
    log.info("repair: %s", str(rep) or "nothing to do")
    return out, rep
