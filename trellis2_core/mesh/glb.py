"""GLB export (trimesh) with a glTF metallic-roughness PBR material; atomic, never clobbers unless asked.

Input: a Mesh in the glTF frame (Y-up; convert engine meshes with mesh.mesh_zup_to_yup) with uvs (glTF convention) and
PBRMaps. trimesh stores UVs with v up and flips them on export, so we hand it 1 - v; what lands in the file is our v.
Textures are PNG by default (lossless); webp=True writes them as WebP (EXT_texture_webp, required by the file;
Pillow's default lossy quality 80, ~5-10x smaller). Bytes are written to a temporary file in the destination folder
and moved into place (rename), so a crash never leaves a half-written GLB and nothing is written anywhere else.
With a normal map the material gets normalTexture and the primitive NORMAL and TANGENT (glTF: viewers must then use
the given tangents, the ones the map was baked in). trimesh writes extra vertex attributes only under an underscore
name, so the tangents go in as `_TANGENT` and the JSON chunk is patched to the standard `TANGENT` afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from .mesh import Mesh, vertex_normals

log = logging.getLogger(__name__)

ALPHA_MODES = ("OPAQUE", "BLEND", "MASK", "AUTO")


def glb_bytes(mesh: Mesh, *, alpha_mode: str = "OPAQUE", alpha_cutoff: float = 0.5, double_sided: bool = False,
              webp: bool = False, auto_translucent_mode: str = "BLEND") -> bytes:
    """Encode `mesh` as a binary glTF (GLB) with a PBR material, or without material if it has no maps.

    alpha_mode: 'OPAQUE' (reference default: alpha stored but inactive), 'BLEND', 'MASK' (alpha_cutoff applies), or
    'AUTO' = OPAQUE unless some texel is translucent, then `auto_translucent_mode` ('BLEND' or 'MASK').
    double_sided: glTF doubleSided (the reference sets it when it does not remesh: open surfaces).
    webp: write textures as WebP with EXT_texture_webp instead of PNG.
    """
    import trimesh
    from PIL import Image

    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a trellis2_core.mesh.Mesh, got {type(mesh).__name__}")
    mode = str(alpha_mode).upper()
    if mode not in ALPHA_MODES:
        raise InputError(f"alpha_mode: expected one of {ALPHA_MODES}, got {alpha_mode!r}")
    if auto_translucent_mode not in ("BLEND", "MASK"):
        raise InputError(f"auto_translucent_mode: expected 'BLEND' or 'MASK', got {auto_translucent_mode!r}")
    if not 0.0 <= float(alpha_cutoff) <= 1.0:
        raise InputError(f"alpha_cutoff: expected a float in [0, 1], got {alpha_cutoff}")
    if mesh.num_faces == 0:
        raise InputError("mesh: has no faces; a GLB needs at least one triangle")
    v = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    kw = {}
    normals = mesh.normals
    has_normal_map = mesh.maps is not None and mesh.maps.normal is not None
    if has_normal_map:
        from .normal_map import vertex_tangents

        # glTF ignores TANGENT without NORMAL (flat normals then): a normal map needs both
        normals = normals if normals is not None else vertex_normals(mesh.vertices, mesh.faces)
        tangents = mesh.tangents if mesh.tangents is not None else \
            vertex_tangents(mesh.vertices, mesh.faces, mesh.uvs, normals)
        kw["vertex_attributes"] = {"_TANGENT": tangents.detach().cpu().numpy().astype(np.float32)}
    if normals is not None:
        kw["vertex_normals"] = normals.detach().cpu().numpy().astype(np.float32)
    if mesh.maps is not None:
        maps = mesh.maps
        if mode == "AUTO":
            mode = auto_translucent_mode if maps.uses_alpha else "OPAQUE"
        mat = trimesh.visual.material.PBRMaterial(
            name="trellis2_pbr",
            baseColorTexture=Image.fromarray(maps.base_color, "RGBA"),
            metallicRoughnessTexture=Image.fromarray(maps.metallic_roughness, "RGB"),
            normalTexture=None if maps.normal is None else Image.fromarray(maps.normal, "RGB"),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=1.0,
            roughnessFactor=1.0,
            alphaMode=mode,
            alphaCutoff=float(alpha_cutoff) if mode == "MASK" else None,
            doubleSided=bool(double_sided),
        )
        uv = mesh.uvs.detach().cpu().numpy().astype(np.float64)
        uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1)  # trimesh flips v on export; pre-flip so the file gets ours
        kw["visual"] = trimesh.visual.TextureVisuals(uv=uv, material=mat)
    elif mesh.uvs is not None:
        uv = mesh.uvs.detach().cpu().numpy().astype(np.float64)
        kw["visual"] = trimesh.visual.TextureVisuals(uv=np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1))
    tm = trimesh.Trimesh(vertices=v, faces=f, process=False, validate=False, **kw)
    scene = trimesh.Scene(tm)
    data = trimesh.exchange.gltf.export_glb(scene, include_normals=normals is not None, extension_webp=bool(webp))
    return _rename_attribute(data, "_TANGENT", "TANGENT") if has_normal_map else data


def _rename_attribute(glb: bytes, old: str, new: str) -> bytes:
    """Rename a primitive attribute in a GLB's JSON chunk (the binary chunk is unchanged)."""
    length = int.from_bytes(glb[12:16], "little")
    if glb[:4] != b"glTF" or glb[16:20] != b"JSON":
        raise RuntimeError("glb: trimesh produced an unexpected GLB layout (no JSON chunk first)")
    doc = json.loads(glb[20:20 + length])
    found = 0
    for m in doc.get("meshes", []):
        for prim in m.get("primitives", []):
            attrs = prim.get("attributes", {})
            if old in attrs:
                attrs[new] = attrs.pop(old)
                found += 1
    if not found:
        raise RuntimeError(f"glb: attribute {old!r} is missing from trimesh's output; cannot write {new}")
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)                      # chunks are 4-byte aligned, JSON padded with spaces
    rest = glb[20 + length:]
    body = len(text).to_bytes(4, "little") + b"JSON" + text + rest
    return glb[:8] + (12 + len(body)).to_bytes(4, "little") + body


def export_glb(mesh: Mesh, path: str | os.PathLike, *, overwrite: bool = False, **options) -> Path:
    """Write `mesh` as a GLB at exactly `path` (options: see glb_bytes). Returns the resolved path.

    Refuses to replace an existing file unless overwrite=True (FileExistsError). The parent folder must exist.
    Atomic: the bytes go to a temporary file beside the destination, then are renamed into place.
    """
    dest = Path(path)
    if dest.suffix.lower() != ".glb":
        raise InputError(f"path: expected a file name ending in .glb, got {str(path)!r}; add the .glb extension")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"path: the folder {str(folder)!r} does not exist; create it first or choose another path")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"path: {str(dest)!r} already exists; pass overwrite=True to replace it or choose "
                              "another file name")
    data = glb_bytes(mesh, **options)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, dest)
        else:
            _link_no_clobber(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("export_glb: wrote %s (%d bytes)", dest, len(data))
    return dest.resolve()


def _link_no_clobber(tmp: str, dest: Path) -> None:
    """Move tmp to dest only if dest does not exist, atomically where the filesystem has hard links."""
    try:
        os.link(tmp, dest)  # fails with FileExistsError if someone created dest meanwhile: no silent clobber
    except FileExistsError:
        raise FileExistsError(f"path: {str(dest)!r} already exists; pass overwrite=True to replace it or choose "
                              "another file name") from None
    except OSError:  # no hard links here (some network/FAT filesystems): best effort check-then-rename
        if dest.exists():
            raise FileExistsError(f"path: {str(dest)!r} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, dest)
