"""Sparse voxel tensors and the spatial operations on them (neighbour maps, submanifold conv, subdivision)."""

from .tensor import SparseTensor

__all__ = ["SparseTensor"]
