"""Submanifold 3x3x3 sparse convolution (the only conv of the SC-VAEs).

``reference`` is plain torch (the CPU/MPS path and the ground truth for the Triton kernel a later task adds
as ``triton.py``). Both share the neighbour-map contract of ``reference.build_neighbours``.
"""

from .reference import build_neighbours, submanifold_conv3d

__all__ = ["build_neighbours", "submanifold_conv3d"]
