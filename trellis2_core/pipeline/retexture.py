"""Texture a user's own mesh: the reference texturing pipeline (SPEC.md section 16), baked onto the untouched mesh.

    normalise (bbox centre, 0.99999 / max extent, glTF Y-up -> engine Z-up)  ->  voxelise at R (flexible dual
    grid, SPEC 10)  ->  shape SC-VAE encoder (latent at R / 16, carrying its subdivision records)  ->  texture
    flow (tex_512 for R <= 512, else tex_1024; exactly the image pipeline's material stage)  ->  texture decoder
    WITHOUT guide_subs (it retraces the encoder's records: PBR attributes on exactly the user's voxels)  ->
    bake onto the user's ORIGINAL mesh.

Frames: the user's mesh is glTF Y-up in any position and scale (ComfyUI MESH, GLB/OBJ loaders). Texel
positions are mapped through the same normalisation into the engine frame (Z-up cube [-0.5, 0.5]^3) where the
voxels live; the returned mesh stays in the user's frame and scale. Unlike the reference (which returns the
normalised mesh) the geometry is never changed:

* ``keep_uvs=True`` and the mesh has UVs: vertices, faces (and normals) are the very same tensors;
* otherwise the mesh is unwrapped, and a UV seam needs its vertices duplicated (glTF UVs are per vertex). The
  result then keeps vertex i of the user's mesh at row i (same bits), appends the seam copies after them, and
  ``vertex_map`` [V_out] says which user vertex each row copies: ``out.vertices == user.vertices[vertex_map]``
  and ``vertex_map[out.faces] == user.faces`` (same faces, same order), bitwise.

Stages are separate functions (``encode_mesh``, ``sample_mesh_material``, ``decode_on_mesh``, ``bake_onto_mesh``) so
nodes can run them apart; ``retexture_mesh`` runs them all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..errors import InputError, stop_if_asked
from ..mesh.bake import bake_textures
from ..mesh.mesh import Mesh, vertex_normals, yup_to_zup
from ..mesh.topology import triangle_areas
from ..mesh.uv import unwrap
from ..ovoxel.attributes import VoxelAttributeField
from ..ovoxel.ovoxel import OVoxel
from ..ovoxel.voxelize import mesh_to_flexible_dual_grid
from ..sampling import SamplerParams
from ..sparse import SparseTensor
from ..sparse.spatial import RECORD_KEY
from ..weights import Normalization
from .components import ComponentSource
from .decode import attach_pbr
from .material import sample_material
from .types import Conditioning, MaterialLatent, ShapeLatent

SHAPE_ENCODER, TEX_DECODER = "shape_slat_encoder", "tex_slat_decoder"
FILL = 0.99999  # the reference's scale: the longest side spans 0.99999 of the unit cube
# SPEC 16 step 3: the texturing pipeline's voxeliser weights.
VOXELIZE = dict(face_weight=1.0, boundary_weight=0.2, regularization_weight=1e-2)


@dataclasses.dataclass(frozen=True)
class MeshNormalization:
    """The user frame -> engine frame map: ``engine = yup_to_zup((p - center) * scale)`` (computed in float64)."""

    center: tuple[float, float, float]
    scale: float

    @classmethod
    def of(cls, vertices: torch.Tensor, faces: torch.Tensor) -> MeshNormalization:
        """From the bounding box of the vertices the faces use (strays cannot shrink the object)."""
        used = vertices[torch.unique(faces.reshape(-1))].to(torch.float64)
        lo, hi = used.min(0).values, used.max(0).values
        extent = float((hi - lo).max())
        if not extent > 0:
            raise InputError("mesh: all its face vertices coincide (zero bounding box); pass a mesh with some extent")
        return cls(tuple(float(c) for c in (lo + hi) / 2), FILL / extent)  # type: ignore[arg-type]

    def to_engine(self, points: torch.Tensor) -> torch.Tensor:
        """User-frame points [..., 3] -> engine frame, float64."""
        c = torch.tensor(self.center, dtype=torch.float64, device=points.device)
        return yup_to_zup((points.to(torch.float64) - c) * self.scale)

    def to_user(self, points: torch.Tensor) -> torch.Tensor:
        """Engine-frame points [..., 3] -> the user's frame, float64 (inverse of ``to_engine``)."""
        p = points.to(torch.float64)
        zup_to_yup = torch.stack([p[..., 0], p[..., 2], -p[..., 1]], dim=-1)
        return zup_to_yup / self.scale + torch.tensor(self.center, dtype=torch.float64, device=points.device)


@dataclasses.dataclass(frozen=True)
class EncodedMesh:
    """A user mesh voxelised and encoded. ``shape``: the encoder's latent (NOT normalised, SPEC 16.3) on grid
    R / 16, carrying the records the texture decoder retraces; ``geometry``: the voxelised mesh at R (offsets in
    [0, 1], no split weights, no subdivision guides); ``normalization``: user frame -> engine frame."""

    shape: ShapeLatent
    geometry: OVoxel
    normalization: MeshNormalization


@dataclasses.dataclass(frozen=True)
class Retexture:
    """Result of ``retexture_mesh``: ``mesh`` in the user's frame with uvs, normals and PBR maps; ``vertex_map``
    [V_out] int64 user vertex of each row (identity when nothing was split); ``ovoxel`` the PBR voxels (engine frame);
    ``material`` the texture latent; ``normalization`` the user -> engine frame map."""

    mesh: Mesh
    vertex_map: torch.Tensor
    ovoxel: OVoxel
    material: MaterialLatent
    normalization: MeshNormalization


def check_resolution(resolution: int) -> int:
    """Grid R: a multiple of 16 in [16, 2048]. Official values 512 and 1024 (the texture flows' training grids)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution % 16 or not 16 <= resolution <= 2048:
        raise InputError(
            f"resolution must be a multiple of 16 in [16, 2048] (the SC-VAE works in 16^3 blocks); got {resolution!r}. "
            "Use 1024 (reference default) or 512 (faster)"
        )
    return resolution


def _check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a trellis2_core.mesh.Mesh (glTF Y-up), got {type(mesh).__name__}")
    if mesh.num_faces == 0:
        raise InputError("mesh: has no faces; retexturing needs a triangle mesh")
    if not bool(torch.isfinite(mesh.vertices).all()):
        bad = int((~torch.isfinite(mesh.vertices)).any(1).sum())
        raise InputError(f"mesh: {bad} vertices are NaN or infinite; repair or remove them first")


@torch.no_grad()
def encode_mesh(components: ComponentSource, mesh: Mesh, resolution: int = 1024) -> EncodedMesh:
    """Normalise, voxelise at ``resolution`` and encode ``mesh`` with the shape SC-VAE encoder (SPEC 16.1-16.3)."""
    _check_mesh(mesh)
    check_resolution(resolution)
    norm = MeshNormalization.of(mesh.vertices, mesh.faces)
    device = components.device
    vertices = norm.to_engine(mesh.vertices).to(device)
    coords, offset, flags = mesh_to_flexible_dual_grid(vertices, mesh.faces.to(device), resolution, **VOXELIZE)
    if coords.shape[0] == 0:
        raise InputError("mesh: voxelising it gave no voxels (all faces degenerate?); pass a mesh with some area")
    batch = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1)
    with components.use(SHAPE_ENCODER) as encoder:
        latent = encoder(SparseTensor(offset, batch), SparseTensor(flags, batch))
    geometry = OVoxel(coords, resolution, offset, flags)
    return EncodedMesh(ShapeLatent(latent=latent, resolution=resolution), geometry, norm)


def sample_mesh_material(components: ComponentSource, cond: Conditioning, encoded: EncodedMesh, **kwargs) -> MaterialLatent:
    """``material.sample_material`` on the encoded mesh's latent (same keyword arguments)."""
    return sample_material(components, cond, encoded.shape, **kwargs)


@torch.no_grad()
def decode_on_mesh(components: ComponentSource, material: MaterialLatent, encoded: EncodedMesh) -> OVoxel:
    """The voxelised mesh with PBR attributes [N, 6] (v * 0.5 + 0.5, unclamped; SPEC 16.5).

    The texture decoder gets no guide_subs: its C2S layers reuse the records the encoder left on the latent,
    which ``material.latent`` still shares (the sampler only replaces features), so it lands on the encoder's
    input voxels in the same row order.
    """
    geometry = encoded.geometry
    latent = material.latent.to(components.device)
    if latent.get_cache(RECORD_KEY) is None:
        raise InputError(
            "material: its latent no longer carries the shape encoder's subdivision records (it was rebuilt or moved "
            f"from {material.latent.device} to {components.device}); sample it with sample_mesh_material on this "
            "EncodedMesh, on the device that decodes it"
        )
    with components.use(TEX_DECODER) as decoder:
        tex = decoder(latent)
    return attach_pbr(tex, geometry, "the mesh", "the material latent was not sampled on this mesh's encoding "
                      "(pass the EncodedMesh it came from)")


def bake_onto_mesh(
    mesh: Mesh,
    ovoxel: OVoxel,
    normalization: MeshNormalization,
    *,
    texture_size: int = 2048,
    keep_uvs: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Mesh, torch.Tensor]:
    """(textured mesh in the user's frame, vertex_map); geometry kept as the module docstring states.

    keep_uvs: use the mesh's own UVs when it has them (they must lie in [0, 1]); else unwrap.
    should_stop: polled before and after the unwrap (one C call) and inside the bake; True raises ``Interrupted``.
    """
    _check_mesh(mesh)
    if ovoxel.attributes is None:
        raise InputError("ovoxel: has no PBR attributes; decode the material latent first (decode_on_mesh)")
    eng = normalization.to_engine(mesh.vertices).float()
    if keep_uvs and mesh.uvs is not None:
        uv = mesh.uvs
        if float(uv.min()) < 0 or float(uv.max()) > 1:
            raise InputError(
                f"mesh.uvs: keep_uvs needs UVs inside [0, 1] (one texture atlas); got range [{float(uv.min()):.3g}, "
                f"{float(uv.max()):.3g}] (tiled UVs). Pass keep_uvs=False to unwrap the mesh anew"
            )
        vertex_map = torch.arange(mesh.num_vertices, device=mesh.vertices.device)
        faces, uvs, bake_faces = mesh.faces, uv, mesh.faces
    else:
        stop_if_asked(should_stop, "retexture interrupted before the UV unwrap")
        vertex_map, faces, uvs, bake_faces = _unwrap_keeping_vertices(eng, mesh.faces, texture_size)
    field = VoxelAttributeField(ovoxel.coords, ovoxel.attributes)
    eng_mesh = Mesh(eng[vertex_map], bake_faces, uvs=uvs)
    stop_if_asked(should_stop, "retexture interrupted before the bake")
    maps = bake_textures(eng_mesh, field, ovoxel.resolution, texture_size=texture_size, should_stop=should_stop)
    normals = mesh.normals if mesh.normals is not None else _unit_normals(mesh.vertices, mesh.faces)
    if vertex_map.shape[0] == mesh.num_vertices:  # nothing split: the user's own tensors
        return mesh.replace(normals=normals, uvs=uvs, maps=maps), vertex_map
    vertices = torch.cat([mesh.vertices, mesh.vertices[vertex_map[mesh.num_vertices:]]])
    out = Mesh(vertices, faces, normals=normals[vertex_map].contiguous(), uvs=uvs, maps=maps)
    return out, vertex_map


def _unit_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals; +Y (glTF up) where none is defined (unreferenced vertices, only zero-area
    faces), since glTF requires unit normals on every vertex."""
    n = vertex_normals(vertices, faces)
    undefined = n.norm(dim=1) < 0.5
    n[undefined] = torch.tensor([0.0, 1.0, 0.0], dtype=n.dtype, device=n.device)
    return n


def _unwrap_keeping_vertices(eng: torch.Tensor, faces: torch.Tensor, texture_size: int):
    """Unwrap, then lay the result out around the user's vertex order.

    Returns (vertex_map [V_out], faces [F, 3] (all of them, original order), uvs [V_out, 2], faces to bake [F', 3]
    (zero-area faces left out: they cannot be charted, and their arbitrary UVs must not overwrite texels)).
    """
    n = eng.shape[0]
    device = faces.device
    good = torch.from_numpy(triangle_areas(eng.cpu().numpy(), faces.cpu().numpy()) > 0).to(device)
    if not bool(good.any()):
        raise InputError("mesh: every face has zero area; nothing can be unwrapped")
    in_faces = faces[good]
    un = unwrap(Mesh(eng, in_faces), texture_size=texture_size)
    out_faces = un.faces.to(device)
    if out_faces.shape != in_faces.shape:
        raise RuntimeError(f"unwrap changed the face count ({in_faces.shape[0]} -> {out_faces.shape[0]}); cannot map UVs back")
    src = torch.full((un.num_vertices,), -1, dtype=torch.int64, device=device)
    src[out_faces.reshape(-1)] = in_faces.reshape(-1)  # unwrap keeps face order and corner order
    if bool((src < 0).any()) or not torch.equal(src[out_faces], in_faces):
        raise RuntimeError("unwrap returned faces that do not correspond corner by corner to its input")
    # First copy of user vertex i -> row i; further copies (seams) -> rows n, n+1, ... in unwrap order.
    first = torch.full((n,), un.num_vertices, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, src, torch.arange(un.num_vertices, device=device), reduce="amin")
    is_first = first[src] == torch.arange(un.num_vertices, device=device)
    extra = torch.nonzero(~is_first).squeeze(1)
    row = src.clone()
    row[extra] = n + torch.arange(extra.shape[0], device=device)
    vertex_map = torch.cat([torch.arange(n, device=device), src[extra]])
    uvs = torch.zeros(vertex_map.shape[0], 2, dtype=torch.float32, device=device)
    uvs[row] = un.uvs.to(device)
    out = faces.clone()
    out[good] = row[out_faces]
    return vertex_map, out, uvs, out[good]


@torch.no_grad()
def retexture_mesh(
    components: ComponentSource,
    cond: Conditioning,
    mesh: Mesh,
    *,
    resolution: int = 1024,
    params: SamplerParams,
    shape_normalization: Normalization,
    tex_normalization: Normalization,
    generator: torch.Generator,
    texture_size: int = 2048,
    keep_uvs: bool = True,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Retexture:
    """PBR textures for ``mesh`` (glTF Y-up, any scale) from ``cond``; the steps of the module docstring.

    generator: the texture noise [N_latent, 32] is its first draw (the reference seeds right before it).
    progress(done, total) counts encode (1) + sampler steps + decode and bake (1).
    should_stop: polled before every sampler step, before the decode, around the unwrap and inside the bake.
    """
    total = params.steps + 2
    encoded = encode_mesh(components, mesh, resolution)
    if progress is not None:
        progress(1, total)
    material = sample_mesh_material(
        components, cond, encoded, params=params, shape_normalization=shape_normalization,
        tex_normalization=tex_normalization, generator=generator, should_stop=should_stop,
        progress=None if progress is None else (lambda d, _n: progress(1 + d, total)),
    )  # fmt: skip
    stop_if_asked(should_stop, "retexture interrupted before decoding the texture voxels")
    ovoxel = decode_on_mesh(components, material, encoded)
    out, vertex_map = bake_onto_mesh(mesh, ovoxel, encoded.normalization, texture_size=texture_size, keep_uvs=keep_uvs,
                                     should_stop=should_stop)
    if progress is not None:
        progress(total, total)
    return Retexture(out, vertex_map, ovoxel, material, encoded.normalization)


__all__ = [
    "EncodedMesh", "MeshNormalization", "Retexture", "bake_onto_mesh", "check_resolution", "decode_on_mesh",
    "encode_mesh", "retexture_mesh", "sample_mesh_material",
]  # fmt: skip
