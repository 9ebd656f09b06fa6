"""Reading a user's mesh file (GLB, glTF, OBJ, PLY, STL, OFF) as one engine Mesh, as-is (trimesh).

No vertex merging or other processing: the vertices, faces and their order are the file's, with the scene graph's
node transforms applied. Coordinates are taken as glTF Y-up (GLB is Y-up by definition; OBJ/PLY files from DCC tools
mostly are too). UVs are kept when every part has them, converted from trimesh's v-up to glTF's v-down convention,
which the engine uses (mesh.py).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .mesh import Mesh

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def read_mesh(path: str | os.PathLike, *, what: str = "path") -> Mesh:
    """The triangles of the file at ``path`` as one Mesh (glTF Y-up; uvs [V, 2] when every part has them).

    what: the argument name errors start with (e.g. "mesh_file" for the ComfyUI node).
    Raises InputError for a file trimesh cannot read or one without triangles.
    """
    import trimesh  # a hard dependency, imported here so importing the engine stays cheap

    name = os.path.basename(os.fspath(path))
    try:
        loaded = trimesh.load(path, process=False, maintain_order=True)
    except Exception as e:  # trimesh raises many types for broken files; name the file and the cause
        raise InputError(f"{what}: trimesh could not read {name!r} ({type(e).__name__}: {e}); "
                         "pass a valid GLB, OBJ or PLY") from e
    parts = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]  # scene graph transforms applied
    parts = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces)]
    if not parts:
        raise InputError(f"{what}: {name!r} holds no triangles (a point cloud or lines?); pass a triangle mesh")
    uvs = [getattr(p.visual, "uv", None) for p in parts]
    has_uvs = all(u is not None and len(u) == len(p.vertices) for u, p in zip(uvs, parts))
    vertices, faces, offset = [], [], 0
    for p in parts:
        vertices.append(np.asarray(p.vertices, np.float64))
        faces.append(np.asarray(p.faces, np.int64) + offset)
        offset += len(p.vertices)
    uv = None
    if has_uvs:
        uv = np.concatenate([np.asarray(u, np.float64) for u in uvs])
        uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1)  # trimesh keeps v up; the engine (and glTF) v down
    return Mesh.from_numpy(np.concatenate(vertices), np.concatenate(faces), uvs=uv)


__all__ = ["MESH_SUFFIXES", "read_mesh"]
