"""O-Voxel: sparse voxels carrying geometry fields and PBR attributes; mesh extraction and voxelisation."""
