"""The production chain from a decoded mesh + PBR voxels to a textured glTF-frame Mesh (SPEC 15, portable).

repair (weld, clean, drop floaters, fill small holes, orient outward) -> decimate (QEM) -> unwrap (patch-split
xatlas) -> bake (UV rasteriser, projection onto the repaired full-resolution surface, sparse trilinear sampling)
-> Z-up to Y-up. The result goes to glb.export_glb. Differences from the reference: no narrow-band remesh (we
repair the decoded surface instead; it keeps thin parts single-layered), orientation is fixed by repair rather than
by remeshing, and the UV layout differs (another charting); the sampled attributes follow the same rule exactly.

Cancellation: both entry points take ``should_stop()``, polled between the stages and passed down into repair,
decimation and the bake (which poll between their own steps and texel pieces); True raises ``Interrupted`` naming
the stage. The unwrap (xatlas) is one C call that cannot be interrupted inside: it is polled before and after.
Inputs are never modified and no partial result escapes (nothing is written anywhere: export is the caller's).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import InputError, stop_if_asked
from ..ovoxel.attributes import VoxelAttributeField
from ..ovoxel.ovoxel import OVoxel
from .bake import AttributeLayout, bake_textures
from .decimate import decimate
from .mesh import Mesh, mesh_zup_to_yup, vertex_normals
from .normal_map import with_tangents
from .orient import orient_faces
from .repair import RepairReport, repair_mesh
from .uv import unwrap

log = logging.getLogger(__name__)


@dataclass
class PostprocessReport:
    """Counts and timings (seconds) of `textured_mesh`."""

    repair: RepairReport
    faces_in: int = 0
    faces_repaired: int = 0
    faces_out: int = 0
    vertices_out: int = 0
    seconds: dict = field(default_factory=dict)


def textured_mesh(
    mesh: Mesh,
    coords: torch.Tensor,
    attrs: torch.Tensor,
    resolution: int,
    *,
    decimation_target: int = 500_000,
    texture_size: int = 2048,
    reuse_uvs: bool = False,
    project: bool = True,
    layout: AttributeLayout = AttributeLayout(),
    repair_options: dict | None = None,
    progress=None,
    normal_map: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Mesh, PostprocessReport]:
    """Decoded engine-frame mesh + voxel PBR attributes -> (glTF Y-up Mesh with UVs, normals and maps, report).

    mesh: engine frame (Z-up, [-0.5, 0.5]^3), e.g. the flexible-dual-grid extraction (any winding).
    coords [N, 3|4] int, attrs [N, C] float: the texture decoder's voxels at `resolution` (layout: SPEC 9).
    decimation_target: face count after QEM (the reference UI default is 500 000).
    reuse_uvs: keep the mesh's own UVs (texturing an existing mesh, SPEC 16): no repair, no decimation.
    project: sample at the closest point of the repaired full-resolution surface (what the reference does).
    repair_options: keyword arguments for repair_mesh (defaults: reference's hole perimeter 0.03, area 1e-5).
    progress: optional callable(done, total) over the 4 stages.
    normal_map: also bake a tangent-space normal map of the repaired full-resolution surface (the projection
    reference; flat where there is none: project=False, reuse_uvs, or no decimation) and attach the tangents it was
    baked in (Mesh.tangents, exported as glTF TANGENT).
    should_stop: optional callable polled before each stage and inside repair, decimation and the bake (not inside
    the unwrap: xatlas is one C call, polled before and after); True raises ``Interrupted`` naming the stage.
    """
    rep = PostprocessReport(repair=RepairReport(), faces_in=mesh.num_faces)
    tick = time.perf_counter()

    def stage(name, i):
        nonlocal tick
        now = time.perf_counter()
        rep.seconds[name] = now - tick
        tick = now
        if progress:
            progress(i, 4)

    def check(what: str) -> None:
        stop_if_asked(should_stop, f"mesh post-processing interrupted {what}")

    field_ = VoxelAttributeField(coords, attrs)
    if reuse_uvs and mesh.uvs is not None:
        work, full = mesh, None
        stage("repair", 1)
        stage("decimate", 2)
        check("before the UV unwrap")
        work = unwrap(work, reuse_existing=True)
    else:
        check("before the repair")
        full, rep.repair = repair_mesh(mesh, **(repair_options or {}), should_stop=should_stop)
        stage("repair", 1)
        check("before the decimation")
        work = decimate(full, decimation_target, should_stop=should_stop)
        stage("decimate", 2)
        check("before the UV unwrap")
        work = unwrap(work.replace(normals=vertex_normals(work.vertices, work.faces)), texture_size=texture_size)
    rep.faces_repaired = full.num_faces if full is not None else mesh.num_faces
    stage("unwrap", 3)
    check("before the bake (after the UV unwrap)")
    ref = full if (project and full is not None and full.num_faces != work.num_faces) else None
    if normal_map:
        work = with_tangents(work)
    maps = bake_textures(work, field_, resolution, texture_size=texture_size, reference=ref, layout=layout,
                         normal_map=normal_map, should_stop=should_stop)
    stage("bake", 4)
    out = mesh_zup_to_yup(work.replace(maps=maps))
    rep.faces_out, rep.vertices_out = out.num_faces, out.num_vertices
    log.info("postprocess: %d -> %d faces, %s", rep.faces_in, rep.faces_out,
             ", ".join(f"{k} {v:.2f}s" for k, v in rep.seconds.items()))
    return out, rep


def bake_ovoxel(
    mesh: Mesh,
    ovoxel: OVoxel,
    *,
    texture_size: int = 2048,
    project_to_surface: bool = True,
    reuse_uvs: bool = False,
    progress=None,
    normal_map: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Mesh:
    """``mesh`` (engine Z-up frame) with UVs and PBR maps baked from ``ovoxel``'s attributes; same surface and
    positions, but unwrapping (not ``reuse_uvs``) splits vertices along UV seams and drops zero-area faces.

    Unwraps (or keeps the mesh's UVs with ``reuse_uvs``), then samples the voxel attributes per texel, at the closest
    point of the O-Voxel's own decoded surface when ``project_to_surface`` (what the reference does after remeshing
    and decimation, SPEC 15 step 4). ``normal_map``: also bake a tangent-space normal map of that decoded surface
    (its winding made consistent first; flat without ``project_to_surface``) and attach the tangents it was baked
    in. ``should_stop``: optional callable polled before and after the unwrap (xatlas is one C call that cannot be
    interrupted inside), before the bake and inside it; True raises ``Interrupted`` naming the stage, ``mesh`` and
    ``ovoxel`` untouched. Returns a new Mesh in the engine frame.
    """
    if not isinstance(ovoxel, OVoxel) or ovoxel.attributes is None:
        raise InputError(
            "ovoxel: this O-Voxel has no PBR attributes (it is geometry only); decode the material latent first "
            "(in ComfyUI: connect the O_VOXEL output of Trellis2Material)"
        )
    lay = ovoxel.attribute_layout
    missing = [k for k in ("base_color", "metallic", "roughness") if k not in lay]
    if missing:
        raise InputError(f"ovoxel: its attributes lack {missing} (it has {sorted(lay)}); a PBR O-Voxel is needed")
    lo, hi = ovoxel.aabb
    sizes = {round(h - l, 9) for l, h in zip(lo, hi)}
    if len(sizes) != 1 or len(set(lo)) != 1:
        raise InputError(f"ovoxel: baking needs a cubic bounding box with equal minima; got aabb {ovoxel.aabb}")
    alpha = lay.get("alpha")
    layout = AttributeLayout(
        base_color=(lay["base_color"].start, lay["base_color"].stop), metallic=lay["metallic"].start,
        roughness=lay["roughness"].start, alpha=None if alpha is None else alpha.start,
    )  # fmt: skip
    stop_if_asked(should_stop, "mesh post-processing interrupted before the UV unwrap")
    work = unwrap(mesh, texture_size=texture_size, reuse_existing=reuse_uvs)
    stop_if_asked(should_stop, "mesh post-processing interrupted after the UV unwrap (before the bake)")
    if normal_map:
        work = with_tangents(work)
    reference = None
    if project_to_surface:
        vertices, faces = ovoxel.to_mesh()
        if normal_map and faces.shape[0]:
            # the decoded surface has arbitrary winding (SPEC 10): orient it so its vertex normals do not cancel
            faces = torch.from_numpy(orient_faces(vertices.cpu().numpy(), faces.cpu().numpy())[0]).to(faces.device)
        reference = Mesh(vertices.float(), faces.long()) if faces.shape[0] else None
    field_ = VoxelAttributeField(ovoxel.coords, ovoxel.attributes.float())
    stop_if_asked(should_stop, "mesh post-processing interrupted before the bake")
    maps = bake_textures(
        work, field_, ovoxel.resolution, texture_size=texture_size, reference=reference, layout=layout,
        aabb_min=float(lo[0]), aabb_size=float(sizes.pop()), progress=progress, normal_map=normal_map,
        should_stop=should_stop,
    )  # fmt: skip
    return work.replace(maps=maps)
