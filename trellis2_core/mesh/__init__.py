"""Meshes: the Mesh dataclass, repair, decimation, UV unwrap, texture baking and GLB export."""
