"""Mesh stages as nodes: O-Voxel to mesh, repair, decimate, UV unwrap + PBR bake.

The MESH socket is core's type (glTF Y-up, see ``nodes.mesh_socket``): meshes from core's 3D nodes come in,
and ours go out to them. Every node returns a new MESH; the input is never modified. Repair, decimation and the
bake poll ComfyUI's Cancel between their steps (``runtime.should_stop``); a cancel there is ComfyUI's interrupt.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..trellis2_core.mesh.decimate import decimate
from ..trellis2_core.mesh.mesh import Mesh
from ..trellis2_core.mesh.postprocess import bake_ovoxel
from ..trellis2_core.mesh.repair import repair_mesh
from . import mesh_socket
from .runtime import cancellable, progress_bar, should_stop
from .sockets import CATEGORY, OVoxelSocket


def _mesh_input(tooltip: str = "A mesh (core MESH, glTF Y-up): from Trellis2OVoxelToMesh or any 3D node.") -> io.Input:
    return io.Mesh.Input("mesh", tooltip=tooltip)


class Trellis2OVoxelToMesh(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2OVoxelToMesh", display_name="TRELLIS.2 O-Voxel to Mesh", category=CATEGORY,
            description="Extract the flexible-dual-grid surface of an O-Voxel (full resolution, Y-up).",
            inputs=[OVoxelSocket.Input("o_voxel", tooltip="An O-Voxel from Trellis2Geometry or Trellis2Material.")],
            outputs=[io.Mesh.Output(display_name="mesh")],
        )  # fmt: skip

    @classmethod
    def execute(cls, o_voxel) -> io.NodeOutput:
        vertices, faces = o_voxel.to_mesh()
        mesh = mesh_socket.from_engine_frame(Mesh(vertices.float(), faces.long()))
        return io.NodeOutput(mesh_socket.to_comfy(mesh_socket.require_faces(mesh, "o_voxel")))


class Trellis2MeshRepair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2MeshRepair", display_name="TRELLIS.2 Mesh Repair", category=CATEGORY,
            description="Weld, drop degenerate/duplicate faces and small floaters, fill small holes, orient outward.",
            inputs=[
                _mesh_input(),
                io.Float.Input("weld_tolerance", default=1e-6, min=0.0, max=0.01, step=1e-6, round=False,
                               tooltip="Merge vertices closer than this (mesh units; the object spans ~1). 0 = exact duplicates only."),
                io.Float.Input("min_component_area", default=1e-5, min=0.0, max=0.1, step=1e-5, round=False,
                               tooltip="Remove floating pieces with less surface area than this (reference 1e-5); 0 keeps all."),
                io.Boolean.Input("remove_inner_shells", default=False,
                                 tooltip="Remove closed pieces enclosed by another closed piece (hidden inner surfaces)."),
                io.Float.Input("max_hole_perimeter", default=0.03, min=0.0, max=1.0, step=0.005,
                               tooltip="Fill holes whose boundary is shorter than this (reference 0.03); 0 = no filling."),
                io.Boolean.Input("orient", default=True, tooltip="Make the winding consistent and the normals point outward."),
            ],
            outputs=[io.Mesh.Output(display_name="mesh"), io.String.Output(display_name="report")],
        )  # fmt: skip

    @classmethod
    def execute(cls, mesh, weld_tolerance, min_component_area, remove_inner_shells, max_hole_perimeter, orient) -> io.NodeOutput:
        with cancellable():
            repaired, report = repair_mesh(
                mesh_socket.from_comfy(mesh), weld_tolerance=weld_tolerance, min_component_area=min_component_area,
                remove_inner=remove_inner_shells, max_hole_perimeter=max_hole_perimeter, orient=orient,
                should_stop=should_stop,
            )  # fmt: skip
        return io.NodeOutput(mesh_socket.to_comfy(repaired), str(report) or "no changes")


class Trellis2MeshDecimate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2MeshDecimate", display_name="TRELLIS.2 Mesh Decimate", category=CATEGORY,
            description="Simplify to at most a target face count (quadric edge collapse). UVs and textures are dropped.",
            inputs=[
                _mesh_input(),
                io.Int.Input("target_faces", default=500000, min=4, max=16777216, step=1000,
                             tooltip="Faces to keep (the official app's default is 500000); a smaller mesh passes unchanged."),
                io.Boolean.Input("preserve_boundary", default=True, tooltip="Never move vertices on open borders."),
            ],
            outputs=[io.Mesh.Output(display_name="mesh")],
        )  # fmt: skip

    @classmethod
    def execute(cls, mesh, target_faces, preserve_boundary) -> io.NodeOutput:
        with cancellable():
            out = decimate(mesh_socket.from_comfy(mesh), target_faces, preserve_boundary=preserve_boundary,
                           should_stop=should_stop)
        return io.NodeOutput(mesh_socket.to_comfy(out))


class Trellis2UVBake(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2UVBake", display_name="TRELLIS.2 UV Unwrap + Bake PBR", category=CATEGORY,
            description="UV-unwrap the mesh and bake the O-Voxel's base colour, metallic, roughness and alpha into textures.",
            inputs=[
                _mesh_input("The mesh to texture (usually repaired and decimated); glTF Y-up."),
                OVoxelSocket.Input("o_voxel", tooltip="The O-Voxel with PBR attributes, from Trellis2Material."),
                io.Int.Input("texture_size", default=2048, min=64, max=8192, step=64,
                             tooltip="Width = height of the textures in pixels (official app 2048)."),
                io.Boolean.Input("project_to_surface", default=True,
                                 tooltip="Sample colours at the closest point of the full-resolution decoded surface, as "
                                         "the reference does (sharper after strong decimation). Off: at the mesh itself."),
                io.Boolean.Input("reuse_existing_uvs", default=False,
                                 tooltip="Keep the mesh's own UVs if it has some inside [0, 1] instead of unwrapping anew."),
                io.Boolean.Input("normal_map", default=False,
                                 tooltip="Also bake a tangent-space normal map of the full-resolution decoded surface "
                                         "(detail a decimated mesh lost); needs project_to_surface. The GLB then carries "
                                         "tangents and a normal texture."),
            ],
            outputs=[io.Mesh.Output(display_name="mesh")],
        )  # fmt: skip

    @classmethod
    def execute(cls, mesh, o_voxel, texture_size, project_to_surface, reuse_existing_uvs, normal_map=False) -> io.NodeOutput:
        engine_mesh = mesh_socket.to_engine_frame(mesh_socket.from_comfy(mesh))
        with cancellable():
            textured = bake_ovoxel(engine_mesh, o_voxel, texture_size=texture_size, project_to_surface=project_to_surface,
                                   reuse_uvs=reuse_existing_uvs, normal_map=normal_map, progress=progress_bar(),
                                   should_stop=should_stop)  # fmt: skip
        return io.NodeOutput(mesh_socket.to_comfy(mesh_socket.from_engine_frame(textured)))


NODES = [Trellis2OVoxelToMesh, Trellis2MeshRepair, Trellis2MeshDecimate, Trellis2UVBake]
