"""Retexturing a user's own mesh: load a mesh file, and generate PBR textures for exactly its geometry.

Trellis2LoadMesh reads a GLB/glTF/OBJ/PLY/STL/OFF from ComfyUI's input folder (also ``input/3d/``, where core's
Load3D uploads go) with the engine's ``read_mesh`` (trellis2_core/mesh/load.py): as-is, glTF Y-up, UVs kept.

Trellis2Retexture makes one engine call, ``retexture_mesh`` (trellis2_core/pipeline/retexture.py, SPEC 16): it
normalises the mesh into the engine frame, voxelises and encodes it with the shape SC-VAE encoder, samples the
texture latent with the conditioning (one image or several views), decodes PBR voxels and bakes them onto the
untouched mesh, returned in the user's frame and scale. The texturing roles come from the model folder's
``texturing_pipeline.json``, which the TRELLIS2_MODEL handle resolves on first need (nodes/model_management.py).
"""

from __future__ import annotations

import hashlib
import os

import folder_paths
from comfy_api.latest import io

from ..trellis2_core.errors import InputError
from ..trellis2_core.mesh.load import MESH_SUFFIXES, read_mesh
from ..trellis2_core.pipeline import rng
from ..trellis2_core.pipeline.material import tex_role
from ..trellis2_core.pipeline.retexture import retexture_mesh
from . import mesh_socket
from .generation import MAX_SEED, _params, _sampler_inputs
from .runtime import cancellable, progress_bar, should_stop
from .sockets import CATEGORY, ConditioningSocket, ModelSocket

RETEXTURE_RESOLUTIONS = ("1024", "512")


# ------------------------------------------------------------------------------------------------ mesh files
def mesh_files() -> list[str]:
    """Mesh files in ComfyUI's input folder and its 3d/ sub-folder (recursively), as '/'-separated relative paths."""
    base = folder_paths.get_input_directory()
    found = []
    if os.path.isdir(base):
        found += [f for f in os.listdir(base) if f.lower().endswith(MESH_SUFFIXES) and os.path.isfile(os.path.join(base, f))]
    sub = os.path.join(base, "3d")
    for folder, _, files in os.walk(sub):
        found += [os.path.relpath(os.path.join(folder, f), base).replace(os.sep, "/") for f in files if f.lower().endswith(MESH_SUFFIXES)]
    return sorted(found)


def _input_path(name: str) -> str:
    base = os.path.abspath(folder_paths.get_input_directory())
    path = os.path.abspath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base or not os.path.isfile(path):
        raise InputError(
            f"mesh_file: {name!r} is not a file in ComfyUI's input folder ({base}); put the GLB/OBJ/PLY in input/ or "
            "input/3d/ (core's Load3D uploads there) and refresh"
        )
    return path


class Trellis2LoadMesh(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2LoadMesh", display_name="TRELLIS.2 Load Mesh", category=CATEGORY,
            description="Read a mesh file (GLB, glTF, OBJ, PLY, STL, OFF) from ComfyUI's input folder as a MESH "
                        "(glTF Y-up), keeping its vertices, faces and UVs exactly.",
            inputs=[
                io.Combo.Input("mesh_file", options=mesh_files(),
                               tooltip="A file in ComfyUI's input/ or input/3d/ folder (core's Load3D uploads land in "
                                       "input/3d/). Y-up is assumed, as in glTF."),
            ],
            outputs=[io.Mesh.Output(display_name="mesh", tooltip="The file's triangles; UVs when every part has them.")],
        )  # fmt: skip

    @classmethod
    def fingerprint_inputs(cls, mesh_file) -> str:
        """Re-read when the file changes (same name, new content), not only when another file is chosen."""
        try:
            stat = os.stat(_input_path(mesh_file))
        except InputError:
            return f"missing:{mesh_file}"
        return hashlib.sha256(f"{mesh_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()

    @classmethod
    def execute(cls, mesh_file) -> io.NodeOutput:
        return io.NodeOutput(mesh_socket.to_comfy(read_mesh(_input_path(mesh_file), what="mesh_file")))


# ------------------------------------------------------------------------------------------------ retexture
class Trellis2Retexture(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2Retexture", display_name="TRELLIS.2 Retexture Mesh", category=CATEGORY,
            description="Generate PBR textures for YOUR mesh from image conditioning (one image or several views). The "
                        "geometry is kept exactly: same vertices and faces, in the mesh's own position and scale.",
            inputs=[
                ModelSocket.Input("model", tooltip="TRELLIS.2 model handle; its folder needs texturing_pipeline.json "
                                                   "(the official snapshot has it) for the shape encoder."),
                ConditioningSocket.Input("conditioning", tooltip="DINOv3 tokens of the image or views "
                                                                 "(Trellis2Conditioning / Trellis2MultiViewConditioning)."),
                io.Mesh.Input("mesh", tooltip="The mesh to texture (glTF Y-up, any position and scale): from "
                                              "Trellis2LoadMesh or any MESH node. One mesh, not a batch."),
                io.Int.Input("seed", default=42, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the texture noise; same seed, same textures."),
                io.Combo.Input("resolution", options=list(RETEXTURE_RESOLUTIONS), default="1024",
                               tooltip="Voxel grid the mesh is encoded at: 1024 (reference default; the 1024 texture "
                                       "flow, needs 1024 conditioning) or 512 (faster, coarser; needs 512 conditioning)."),
                io.Int.Input("texture_size", default=2048, min=64, max=8192, step=64,
                             tooltip="Width and height of the baked base-colour and metallic-roughness maps."),
                io.Boolean.Input("keep_uvs", default=True,
                                 tooltip="Bake into the mesh's own UVs when it has them (inside [0, 1]); off, or a mesh "
                                         "without UVs: unwrap anew (seam vertices are duplicated, positions unchanged)."),
                *_sampler_inputs(12, 1.0, 0.0, (0.6, 0.9), 3.0),
            ],
            outputs=[io.Mesh.Output(display_name="mesh", tooltip="The same geometry with UVs, normals and PBR maps.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, conditioning, mesh, seed, resolution, texture_size, keep_uvs, **sampler) -> io.NodeOutput:
        if resolution not in RETEXTURE_RESOLUTIONS:
            raise InputError(f"resolution must be one of {list(RETEXTURE_RESOLUTIONS)}; got {resolution!r}")
        grid = int(resolution)
        count = mesh_socket.batch_size(mesh)
        if count != 1:
            raise InputError(f"mesh: expected one mesh; got a MESH batch of {count}. Retexture one mesh per node")
        user = mesh_socket.from_comfy(mesh)  # glTF Y-up: the frame retexture_mesh takes
        _, cond_res = tex_role(grid)
        if cond_res not in conditioning.tokens:
            raise InputError(
                f"conditioning: retexturing at resolution {grid} needs DINOv3 tokens at {cond_res}, but it has "
                f"{sorted(conditioning.tokens)}; set the conditioning node's resolutions to include {cond_res}"
            )
        require = getattr(model.components, "require_texturing", None)
        if require is not None:
            require()
        params = _params(model, "tex_slat", **sampler)
        with cancellable():
            result = retexture_mesh(
                model.components, conditioning, user, resolution=grid, params=params,
                shape_normalization=model.files.normalizations["shape_slat_normalization"],
                tex_normalization=model.files.normalizations["tex_slat_normalization"],
                generator=rng.generator(seed=seed), texture_size=texture_size, keep_uvs=keep_uvs,
                progress=progress_bar(), should_stop=should_stop,
            )  # fmt: skip
        return io.NodeOutput(mesh_socket.to_comfy(result.mesh))


NODES = [Trellis2LoadMesh, Trellis2Retexture]
__all__ = ["NODES", "Trellis2LoadMesh", "Trellis2Retexture", "mesh_files", "read_mesh"]
