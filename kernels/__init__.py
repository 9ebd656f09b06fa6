"""Triton kernels, each beside a plain-torch reference that is also the CPU path.

Layout: ``kernels/<op>/reference.py`` (readable torch, the default and the CPU/MPS path) and
``kernels/<op>/triton.py`` (the CUDA fast path). Imports torch and triton only; triton lazily.
"""
