"""The Mesh dataclass every post-processing step takes and returns, and the engine -> glTF frame change.

Frames and units:
* Engine object frame (what the decoders produce, SPEC 2): Z-up, the cube [-0.5, 0.5]^3, unitless.
* glTF frame (what GLB files and ComfyUI's MESH hold): Y-up, right-handed, same unitless cube after
  `zup_to_yup` ((x, y, z) -> (x, z, -y), a proper rotation, so winding and outward normals survive).
The post-processing functions are frame-agnostic: they work in whatever frame the Mesh is in; only the
baker needs the frame the voxel attributes live in (the engine frame), and `export_glb` expects glTF Y-up.

UV convention: glTF's, origin at the top-left of the image, v grows downwards, so texel (row i, column j)
covers uv in [j/W, (j+1)/W] x [i/H, (i+1)/H]. Values in [0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class PBRMaps:
    """Baked textures, uint8 HxWxC numpy arrays as glTF wants them.

    base_color: [H, W, 4] RGBA, RGB sRGB-encoded, A linear coverage/opacity.
    metallic_roughness: [H, W, 3], R unused (0), G roughness, B metallic (linear), the glTF packing.
    normal: optional [H, W, 3] tangent-space normal map (glTF convention), or None.
    """

    base_color: np.ndarray
    metallic_roughness: np.ndarray
    normal: np.ndarray | None = None

    def __post_init__(self):
        for name, arr, ch in (("base_color", self.base_color, 4), ("metallic_roughness", self.metallic_roughness, 3)):
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == ch):
                got = f"{type(arr).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}"
                raise InputError(f"PBRMaps.{name}: expected a uint8 numpy array [H, W, {ch}], got {got}; "
                                 "bake textures with trellis2_core.mesh.bake.bake_textures")
        n = self.normal
        if n is not None and not (isinstance(n, np.ndarray) and n.dtype == np.uint8 and n.ndim == 3
                                  and n.shape[2] == 3):
            raise InputError(f"PBRMaps.normal: expected None or a uint8 numpy array [H, W, 3], got "
                             f"{type(n).__name__} {getattr(n, 'dtype', '')} {getattr(n, 'shape', '')}; bake it "
                             "with bake_textures(..., normal_map=True)")

    @property
    def uses_alpha(self) -> bool:
        """True if any texel is visibly translucent (alpha < 250/255)."""
        return bool((self.base_color[..., 3] < 250).any())


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh with optional per-vertex normals, UVs and PBR textures.

    vertices: [V, 3] float32 (CPU or any device). faces: [F, 3] int64, indices into vertices.
    normals: optional [V, 3] float32, unit length. uvs: optional [V, 2] float32 in [0, 1] (glTF convention, see
    the module docstring); a vertex on a UV seam is duplicated, so uvs are per vertex.
    maps: optional PBRMaps (needs uvs).
    tangents: optional [V, 4] float32 glTF tangents (xyz unit, towards +u; w = +-1 handedness, see normal_map.py),
    set when a normal map is baked: the map is only valid with exactly these tangents.
    Frozen: steps return new meshes and never mutate their input.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    normals: torch.Tensor | None = None
    uvs: torch.Tensor | None = None
    maps: PBRMaps | None = None
    tangents: torch.Tensor | None = None

    def __post_init__(self):
        v, f = self.vertices, self.faces
        if not (isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[1] == 3 and v.dtype == torch.float32):
            raise InputError(f"Mesh.vertices: expected a float32 tensor [V, 3], got {_desc(v)}; "
                             "use Mesh.from_numpy(...) or .float()")
        if not (isinstance(f, torch.Tensor) and f.ndim == 2 and f.shape[1] == 3 and f.dtype == torch.int64):
            raise InputError(f"Mesh.faces: expected an int64 tensor [F, 3], got {_desc(f)}; use .long()")
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= v.shape[0]):
            raise InputError(f"Mesh.faces: indices must lie in [0, {v.shape[0]}), got [{int(f.min())}, "
                             f"{int(f.max())}]; the faces do not belong to these vertices")
        for name, t, c in (("normals", self.normals, 3), ("uvs", self.uvs, 2), ("tangents", self.tangents, 4)):
            if t is not None and not (isinstance(t, torch.Tensor) and t.shape == (v.shape[0], c)
                                      and t.dtype == torch.float32):
                raise InputError(f"Mesh.{name}: expected a float32 tensor [{v.shape[0]}, {c}] (one row per "
                                 f"vertex), got {_desc(t)}")
        if self.maps is not None and self.uvs is None:
            raise InputError("Mesh.maps: textures need UVs, but uvs is None; unwrap first "
                             "(trellis2_core.mesh.uv.unwrap)")

    @classmethod
    def from_numpy(cls, vertices, faces, **kw) -> "Mesh":
        """Build from array-likes, converting dtypes (vertices -> float32, faces -> int64)."""
        conv = {k: (None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32))
                for k, a in kw.items() if k in ("normals", "uvs", "tangents")}
        return cls(torch.as_tensor(np.asarray(vertices), dtype=torch.float32),
                   torch.as_tensor(np.asarray(faces), dtype=torch.int64),
                   maps=kw.get("maps"), **conv)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def replace(self, **changes) -> "Mesh":
        """A copy with some fields changed (dataclasses.replace; validation runs again)."""
        return dataclasses.replace(self, **changes)

    def to(self, device) -> "Mesh":
        """Move every tensor to `device` (the maps stay numpy)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(mv(self.vertices), mv(self.faces), mv(self.normals), mv(self.uvs), self.maps, mv(self.tangents))


def zup_to_yup(points: torch.Tensor) -> torch.Tensor:
    """Engine Z-up object frame -> glTF Y-up: (x, y, z) -> (x, z, -y). points [..., 3]; works for normals too.

    A rotation by -90 degrees about x (determinant +1), so face winding and outward normals are preserved.
    """
    return torch.stack([points[..., 0], points[..., 2], -points[..., 1]], dim=-1)


def yup_to_zup(points: torch.Tensor) -> torch.Tensor:
    """Inverse of `zup_to_yup`: (x, y, z) -> (x, -z, y) (SPEC 16's glTF -> engine axis swap)."""
    return torch.stack([points[..., 0], -points[..., 2], points[..., 1]], dim=-1)


def mesh_zup_to_yup(mesh: Mesh) -> Mesh:
    """The whole mesh (vertices, normals, tangents' xyz) from the engine frame to glTF's; UVs and maps unchanged
    (a rotation keeps the tangents' handedness w)."""
    return mesh.replace(vertices=zup_to_yup(mesh.vertices).contiguous(),
                        normals=None if mesh.normals is None else zup_to_yup(mesh.normals).contiguous(),
                        tangents=_rotate_tangents(mesh.tangents, zup_to_yup))


def mesh_yup_to_zup(mesh: Mesh) -> Mesh:
    """The whole mesh from glTF's frame (the MESH socket, GLB files) to the engine's Z-up frame."""
    return mesh.replace(vertices=yup_to_zup(mesh.vertices).contiguous(),
                        normals=None if mesh.normals is None else yup_to_zup(mesh.normals).contiguous(),
                        tangents=_rotate_tangents(mesh.tangents, yup_to_zup))


def _rotate_tangents(tangents, rotate):
    if tangents is None:
        return None
    return torch.cat([rotate(tangents[:, :3]), tangents[:, 3:]], 1).contiguous()


def face_normals(vertices: torch.Tensor, faces: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[F, 3] face normals (right-hand rule on the winding); unnormalised they are 2 x area-weighted."""
    tri = vertices[faces]
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return torch.nn.functional.normalize(n, dim=1) if normalize else n


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] area-weighted vertex normals, unit length (zero vectors for unreferenced vertices)."""
    fn = face_normals(vertices, faces, normalize=False)
    vn = torch.zeros_like(vertices)
    vn.index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(vn, dim=1)


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor {tuple(t.shape)}"
    return f"{type(t).__name__} {getattr(t, 'shape', '')}"
