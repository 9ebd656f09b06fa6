"""MESH socket: our engine ``Mesh`` <-> ComfyUI core's ``MESH``, both ways, across ComfyUI versions.

Core's MESH (comfy_api.latest._util.geometry_types, ComfyUI 0.3.75 and later) holds ``vertices`` float (B, N, 3)
and ``faces`` int (B, M, 3) in glTF's Y-up frame. Newer cores add optional fields: ``uvs`` (B, N, 2), ``normals``
(B, N, 3), ``texture`` (B, H, W, 3) and ``metallic_roughness`` (B, H, W, 3) float in [0, 1], and ``vertex_counts`` /
``face_counts`` (B,) when items of different sizes are zero-padded into one batch. We detect each field from the
running core's ``MESH`` constructor and pass what it accepts; on older cores the same names are set as plain
attributes, so core nodes that read only vertices/faces work and newer readers find the extras.

Our meshes carry more than core can (texture alpha, uint8 maps): the exact engine ``Mesh`` rides along as the
attribute ``trellis2_mesh`` and is used again only while the MESH still holds the very tensors we put in.
Frames: everything on the MESH socket is glTF Y-up (the engine works Z-up; conversions happen at the O-Voxel
and bake boundaries, see ``to_engine_frame`` / ``from_engine_frame``).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from comfy_api.latest import Types

from ..trellis2_core.errors import InputError
from ..trellis2_core.mesh.mesh import Mesh, PBRMaps, mesh_yup_to_zup, mesh_zup_to_yup

_EXTRA_FIELDS = ("uvs", "normals", "texture", "metallic_roughness")
_ATTR = "trellis2_mesh"


def _accepted_fields() -> set[str]:
    try:
        return set(inspect.signature(Types.MESH.__init__).parameters)
    except (TypeError, ValueError):  # a C-implemented or otherwise opaque constructor: pass only the basics
        return {"vertices", "faces"}


def to_comfy(mesh: Mesh) -> Types.MESH:
    """A batch-of-one core MESH (glTF Y-up) from an engine Mesh already in glTF Y-up. No data is copied twice."""
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a trellis2_core.mesh.Mesh, got {type(mesh).__name__}")
    extras = {
        "uvs": None if mesh.uvs is None else mesh.uvs[None],
        "normals": None if mesh.normals is None else mesh.normals[None],
        "texture": None,
        "metallic_roughness": None,
    }
    if mesh.maps is not None:
        extras["texture"] = torch.from_numpy(mesh.maps.base_color[..., :3].astype(np.float32) / 255)[None]
        extras["metallic_roughness"] = torch.from_numpy(mesh.maps.metallic_roughness.astype(np.float32) / 255)[None]
    vertices, faces = mesh.vertices[None], mesh.faces[None]
    accepted = _accepted_fields()
    out = Types.MESH(vertices, faces, **{k: v for k, v in extras.items() if k in accepted and v is not None})
    for name, value in extras.items():
        if getattr(out, name, None) is None:
            setattr(out, name, value)
    setattr(out, _ATTR, (mesh, vertices, faces))
    return out


def batch_size(mesh) -> int:
    """Number of meshes in a core MESH (1 for unbatched (N, 3) tensors)."""
    _check_core(mesh)
    return 1 if mesh.vertices.dim() == 2 else int(mesh.vertices.shape[0])


def from_comfy(mesh, index: int = 0, *, what: str = "mesh") -> Mesh:
    """Item ``index`` of a core MESH as an engine Mesh (glTF Y-up). Raises InputError for meshes without faces."""
    _check_core(mesh, what)
    own = getattr(mesh, _ATTR, None)
    if own is not None and index == 0 and own[1] is mesh.vertices and own[2] is mesh.faces:
        return require_faces(own[0], what)
    n = batch_size(mesh)
    if not 0 <= index < n:
        raise InputError(f"{what}: asked for item {index} of a MESH batch of {n}")

    batched = mesh.vertices.dim() == 3

    def item(t, counts):
        if t is None:
            return None
        t = t[index] if batched else t
        return t if counts is None else t[: int(counts[index])]

    vcount, fcount = getattr(mesh, "vertex_counts", None), getattr(mesh, "face_counts", None)
    vertices = item(mesh.vertices, vcount).float()
    faces = item(mesh.faces, fcount).long()
    extras = {}
    for name, width in (("uvs", 2), ("normals", 3)):
        t = item(getattr(mesh, name, None), vcount)
        if t is not None and tuple(t.shape) == (vertices.shape[0], width):
            extras[name] = t.float()
    maps = _maps(mesh, index) if "uvs" in extras else None
    return require_faces(Mesh(vertices, faces, maps=maps, **extras), what)


def _maps(mesh, index: int) -> PBRMaps | None:
    """PBR maps from core's float textures (opaque: core MESH has no alpha), or None if the mesh has none."""
    tex, mr = getattr(mesh, "texture", None), getattr(mesh, "metallic_roughness", None)
    if not isinstance(tex, torch.Tensor) or tex.dim() != 4 or tex.shape[-1] < 3:
        return None

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    color = u8(tex[min(index, tex.shape[0] - 1), ..., :3])
    alpha = np.full(color.shape[:2] + (1,), 255, np.uint8)
    if isinstance(mr, torch.Tensor) and mr.dim() == 4 and mr.shape[-1] >= 3:
        mr_u8 = u8(mr[min(index, mr.shape[0] - 1), ..., :3])
    else:  # glTF defaults: roughness 1, metallic 0 when only a colour texture is given
        mr_u8 = np.zeros(color.shape[:2] + (3,), np.uint8)
        mr_u8[..., 1] = 255
    return PBRMaps(base_color=np.concatenate([color, alpha], axis=2), metallic_roughness=mr_u8)


def _check_core(mesh, what: str = "mesh") -> None:
    v, f = getattr(mesh, "vertices", None), getattr(mesh, "faces", None)
    if not isinstance(v, torch.Tensor) or not isinstance(f, torch.Tensor) or v.dim() not in (2, 3) or v.shape[-1] != 3 \
            or f.dim() != v.dim() or f.shape[-1] != 3:  # fmt: skip
        got = f"vertices {getattr(v, 'shape', type(v).__name__)}, faces {getattr(f, 'shape', type(f).__name__)}"
        raise InputError(f"{what}: expected a MESH with vertices (B, N, 3) and faces (B, M, 3); got {got}")


def require_faces(mesh: Mesh, what: str) -> Mesh:
    if mesh.num_faces == 0:
        raise InputError(
            f"{what}: the mesh has no faces ({mesh.num_vertices} vertices, 0 triangles); nothing to process. "
            "Check the geometry stage (an O-Voxel with too few voxels gives no surface) or connect another mesh."
        )
    return mesh


def to_engine_frame(mesh: Mesh) -> Mesh:
    """glTF Y-up (the MESH socket) -> the engine's Z-up object frame, where O-Voxel attributes live."""
    return mesh_yup_to_zup(mesh)


def from_engine_frame(mesh: Mesh) -> Mesh:
    """Engine Z-up -> glTF Y-up (the MESH socket)."""
    return mesh_zup_to_yup(mesh)


__all__ = ["batch_size", "from_comfy", "from_engine_frame", "require_faces", "to_comfy", "to_engine_frame"]
