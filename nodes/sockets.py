"""The pack's socket types (DESIGN.md, "Sockets"): what flows along each typed wire.

TRELLIS2_MODEL           a ``Trellis2Pipeline`` whose components go through ComfyUI's model management
                         (``nodes.model_management.ComfyComponents``).
TRELLIS2_CONDITIONING    ``pipeline.types.Conditioning``: DINOv3 tokens per resolution (512 and/or 1024).
TRELLIS2_STRUCTURE       ``pipeline.types.Structure``: occupied voxels [N, 4] int32 + the random stream's state.
TRELLIS2_SHAPE_LATENT    ``pipeline.types.ShapeLatent``: denormalised 32-channel sparse latent, resolution R.
TRELLIS2_MATERIAL_LATENT ``pipeline.types.MaterialLatent``: PBR latent on the shape latent's voxels.
O_VOXEL                  ``ovoxel.OVoxel``: sparse voxels with dual-grid geometry, optional PBR attributes and the
                         subdivision guides the texture decoder needs. Engine frame (Z-up, cube [-0.5, 0.5]^3).
MESH                     core's ``MESH`` (``io.Mesh``), glTF Y-up; see ``nodes.mesh_socket`` for what we add.

Every value is treated as immutable: nodes build new objects and never edit what they receive, because
ComfyUI caches node outputs and hands the same object to every consumer.
"""

from comfy_api.latest import io

ModelSocket = io.Custom("TRELLIS2_MODEL")
ConditioningSocket = io.Custom("TRELLIS2_CONDITIONING")
StructureSocket = io.Custom("TRELLIS2_STRUCTURE")
ShapeLatentSocket = io.Custom("TRELLIS2_SHAPE_LATENT")
MaterialLatentSocket = io.Custom("TRELLIS2_MATERIAL_LATENT")
OVoxelSocket = io.Custom("O_VOXEL")

CATEGORY = "3d/trellis2"

__all__ = [
    "CATEGORY",
    "OVoxelSocket",
    "ConditioningSocket",
    "MaterialLatentSocket",
    "ModelSocket",
    "ShapeLatentSocket",
    "StructureSocket",
]
