"""O-Voxel: sparse voxels carrying geometry fields and PBR attributes; mesh extraction and voxelisation."""

from .flexible_dual_grid import DEFAULT_AABB, fdg_head, flexible_dual_grid_to_mesh
from .ovoxel import PBR_LAYOUT, OVoxel
from .voxelize import mesh_to_flexible_dual_grid

__all__ = ["DEFAULT_AABB", "PBR_LAYOUT", "OVoxel", "fdg_head", "flexible_dual_grid_to_mesh", "mesh_to_flexible_dual_grid"]
