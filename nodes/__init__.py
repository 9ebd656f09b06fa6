"""ComfyUI nodes: thin V3-schema wrappers, one engine call each. Imported only by ComfyUI.

Importing this package touches neither ComfyUI nor a GPU: the node modules (which import ``comfy_api``) load
inside ``comfy_entrypoint``, which ComfyUI calls once at start-up. The pack's root ``__init__.py`` re-exports it.
"""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: returns the pack's ComfyExtension (all Trellis2* nodes)."""
    from .extension import make_extension

    return make_extension()


__all__ = ["comfy_entrypoint"]
