"""UV unwrap + PBR bake of an O-Voxel's attributes onto a MESH: the sequence of engine calls the UV-bake node runs.

This is composition only (the engine has no single "texture this mesh from this O-Voxel" call yet): the MESH
socket is glTF Y-up, the voxel attributes live in the engine's Z-up frame, so the mesh goes to the engine frame,
is unwrapped (trellis2_core.mesh.uv.unwrap) and baked (trellis2_core.mesh.bake.bake_textures), optionally sampling
at the closest point of the O-Voxel's own decoded surface as the reference does after remeshing/decimation
(SPEC 15 step 4), and comes back Y-up.
"""

from __future__ import annotations

from typing import Callable

from ..trellis2_core.errors import InputError
from ..trellis2_core.mesh.bake import AttributeLayout, bake_textures
from ..trellis2_core.mesh.mesh import Mesh
from ..trellis2_core.mesh.uv import unwrap
from ..trellis2_core.ovoxel.attributes import VoxelAttributeField
from ..trellis2_core.ovoxel.ovoxel import OVoxel
from .mesh_socket import from_engine_frame, to_engine_frame


def _layout(ovoxel: OVoxel) -> AttributeLayout:
    lay = ovoxel.attribute_layout
    missing = [k for k in ("base_color", "metallic", "roughness") if k not in lay]
    if missing:
        raise InputError(f"o_voxel: its attributes lack {missing} (it has {sorted(lay)}); connect the material node's O_VOXEL")
    alpha = lay.get("alpha")
    return AttributeLayout(
        base_color=(lay["base_color"].start, lay["base_color"].stop),
        metallic=lay["metallic"].start,
        roughness=lay["roughness"].start,
        alpha=None if alpha is None else alpha.start,
    )


def bake_pbr(mesh: Mesh, ovoxel: OVoxel, *, texture_size: int, project_to_surface: bool, reuse_uvs: bool,
             progress: Callable[[int, int], None] | None = None) -> Mesh:  # fmt: skip
    """A copy of ``mesh`` (glTF Y-up) with UVs, normals and baked PBR maps from ``ovoxel``'s attributes."""
    if not isinstance(ovoxel, OVoxel) or ovoxel.attributes is None:
        raise InputError(
            "o_voxel: this O-Voxel has no PBR attributes (it is geometry only); connect the O_VOXEL output of "
            "Trellis2Material, not the geometry's"
        )
    (lo, hi) = ovoxel.aabb
    sizes = {round(h - l, 9) for l, h in zip(lo, hi)}
    if len(sizes) != 1 or len(set(lo)) != 1:
        raise InputError(f"o_voxel: baking needs a cubic bounding box with equal minima; got aabb {ovoxel.aabb}")
    engine_mesh = unwrap(to_engine_frame(mesh), texture_size=texture_size, reuse_existing=reuse_uvs)
    reference = None
    if project_to_surface:
        vertices, faces = ovoxel.to_mesh()
        reference = Mesh(vertices.float(), faces.long()) if faces.shape[0] else None
    field = VoxelAttributeField(ovoxel.coords, ovoxel.attributes.float())
    maps = bake_textures(
        engine_mesh, field, ovoxel.resolution, texture_size=texture_size, reference=reference, layout=_layout(ovoxel),
        aabb_min=float(lo[0]), aabb_size=float(sizes.pop()), progress=progress,
    )  # fmt: skip
    return from_engine_frame(engine_mesh.replace(maps=maps))


__all__ = ["bake_pbr"]
