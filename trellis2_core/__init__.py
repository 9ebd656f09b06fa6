"""The TRELLIS.2 engine: models, sampling, O-Voxel and mesh processing. Framework-free (never imports ComfyUI)."""
