"""ComfyUI nodes: thin V3-schema wrappers, one engine call each. Imported only by ComfyUI."""
