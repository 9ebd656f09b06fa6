"""Meshes: the Mesh dataclass, file loading, repair, decimation, UV unwrap, texture baking and GLB export."""
