"""TRELLIS.2 for ComfyUI.

ComfyUI imports this folder as a package. Importing it never touches ComfyUI, a GPU or an optional
package; the nodes are built only when ComfyUI asks for them. Outside ComfyUI the same tree installs as
the Python package ``trellis2`` (engine: ``trellis2.trellis2_core``).
"""

WEB_DIRECTORY = "./web/js"

# Nodes register through the V3 entry point once the nodes layer lands; the legacy mappings stay empty.
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["WEB_DIRECTORY", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
