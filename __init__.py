"""TRELLIS.2 for ComfyUI.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node schema). Importing it never
touches ComfyUI, a GPU or an optional package: the nodes are built only when ComfyUI asks for them. Outside
ComfyUI the same tree installs as the Python package ``trellis2`` (engine: ``trellis2.trellis2_core``).

There is deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI 0.3.75 reads it first and, if present (even empty),
never calls ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web/js"

from .nodes import comfy_entrypoint  # noqa: E402  (imports nothing of ComfyUI until called)

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
