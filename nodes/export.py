"""GLB export and preview nodes.

Both write binary glTF with a PBR material (trellis2_core.mesh.glb) and return the UI payload our three.js widget
reads: ``{"glb": [{"filename", "subfolder", "type"}]}`` (``type`` "output" or "temp", as ComfyUI's /view expects).
Export also returns the file's path relative to the output folder, which core's Preview3D of ComfyUI 0.3.75 takes
as ``model_file``; where the running ComfyUI has core's 3D-file type (``File3D``, 2026 cores) it also returns one,
which core's Preview3D / SaveGLB accept.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import Types, io

from ..trellis2_core.mesh.glb import ALPHA_MODES, export_glb
from . import mesh_socket
from .sockets import CATEGORY

HAS_FILE3D = hasattr(io, "File3DGLB") and hasattr(Types, "File3D")
_MAX_TRIES = 1000  # counter bumps when another writer took a name between our listing and our write


def _write(mesh, prefix: str, folder: str, options: dict) -> list[dict]:
    """Write every item of ``mesh`` as ``<prefix>_<counter>_.glb`` under ``folder``; never replaces a file."""
    full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
    entries = []
    for index in range(mesh_socket.batch_size(mesh)):
        item = mesh_socket.from_comfy(mesh, index)
        for _ in range(_MAX_TRIES):
            filename = f"{name}_{counter:05}_.glb"
            counter += 1
            try:
                export_glb(item, os.path.join(full_folder, filename), overwrite=False, **options)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"filename_prefix: {_MAX_TRIES} names after {name}_ are taken in {full_folder}; choose another prefix")
        entries.append({"filename": filename, "subfolder": subfolder})
    return entries


def _glb_options() -> list[io.Input]:
    return [
        io.Combo.Input("alpha_mode", options=list(ALPHA_MODES), default="OPAQUE",
                       tooltip="How viewers use the texture alpha: OPAQUE (reference; alpha stored, ignored), BLEND, MASK, "
                               "or AUTO (BLEND only if some texel is translucent)."),
        io.Boolean.Input("double_sided", default=False,
                         tooltip="Render back faces too (the reference sets it for meshes that were not remeshed)."),
        io.Boolean.Input("webp_textures", default=False,
                         tooltip="Store textures as WebP (5-10x smaller files; needs viewers with EXT_texture_webp)."),
    ]  # fmt: skip


class Trellis2ExportGLB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        outputs = [io.String.Output(display_name="glb_path", tooltip="Path relative to ComfyUI's output folder (core Preview3D's model_file).")]
        if HAS_FILE3D:
            outputs.append(io.File3DGLB.Output(display_name="model_3d", tooltip="The GLB as core's 3D file type."))
        return io.Schema(
            node_id="Trellis2ExportGLB", display_name="TRELLIS.2 Export GLB", category=CATEGORY, is_output_node=True,
            description="Save the mesh as a GLB (PBR material) in ComfyUI's output folder; never overwrites a file.",
            inputs=[
                io.Mesh.Input("mesh", tooltip="The mesh to save (textured from Trellis2UVBake, or any MESH)."),
                io.String.Input("filename_prefix", default="trellis2/mesh",
                                tooltip="File name start, may include sub-folders of the output folder; a counter follows."),
                *_glb_options(),
            ],
            outputs=outputs,
        )  # fmt: skip

    @classmethod
    def execute(cls, mesh, filename_prefix, alpha_mode, double_sided, webp_textures) -> io.NodeOutput:
        options = {"alpha_mode": alpha_mode, "double_sided": double_sided, "webp": webp_textures}
        entries = [{**e, "type": "output"} for e in _write(mesh, filename_prefix, folder_paths.get_output_directory(), options)]
        first = entries[0]
        path = f"{first['subfolder']}/{first['filename']}" if first["subfolder"] else first["filename"]
        results = [path.replace(os.sep, "/")]
        if HAS_FILE3D:
            results.append(Types.File3D(os.path.join(folder_paths.get_output_directory(), first["subfolder"], first["filename"])))
        return io.NodeOutput(*results, ui={"glb": entries})


class Trellis2PreviewGLB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2PreviewGLB", display_name="TRELLIS.2 Preview GLB", category=CATEGORY, is_output_node=True,
            description="Show the mesh in the node's 3D viewer (a GLB in ComfyUI's temp folder, cleared at restart).",
            inputs=[io.Mesh.Input("mesh", tooltip="The mesh to preview (any MESH)."), *_glb_options()],
            outputs=[],
        )  # fmt: skip

    @classmethod
    def execute(cls, mesh, alpha_mode, double_sided, webp_textures) -> io.NodeOutput:
        options = {"alpha_mode": alpha_mode, "double_sided": double_sided, "webp": webp_textures}
        entries = _write(mesh, "trellis2_preview", folder_paths.get_temp_directory(), options)
        return io.NodeOutput(ui={"glb": [{**e, "type": "temp"} for e in entries]})


NODES = [Trellis2ExportGLB, Trellis2PreviewGLB]
