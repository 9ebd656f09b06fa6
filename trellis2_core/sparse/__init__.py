"""Sparse voxel tensors and the spatial operations on them (neighbour maps, submanifold conv, subdivision)."""

from .tensor import SparseTensor, batch_items

__all__ = ["SparseTensor", "batch_items"]
