"""The V3 extension ComfyUI asks for through ``comfy_entrypoint``: every node of the pack."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import export, generation, mesh_nodes, multiview, retexture
from .model_management import register_model_folder


class Trellis2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*generation.NODES, *multiview.NODES, *mesh_nodes.NODES, *retexture.NODES, *export.NODES]


def make_extension() -> Trellis2Extension:
    register_model_folder()  # models/trellis2/ exists as a ComfyUI model folder before any schema lists it
    return Trellis2Extension()
