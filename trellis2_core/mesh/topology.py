"""Topology helpers shared by repair, hole filling and orientation (numpy, CPU: these are index manipulations).

Conventions: vertices [V, 3] float, faces [F, 3] int64. Half-edge k of face f goes faces[f, k] -> faces[f, (k+1) % 3];
half-edges are numbered 3 f + k.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


def half_edges(faces: np.ndarray) -> np.ndarray:
    """[3F, 2] directed edges (a, b), half-edge 3 f + k = (faces[f, k], faces[f, k+1 mod 3])."""
    return np.stack([faces, np.roll(faces, -1, axis=1)], axis=2).reshape(-1, 2)


def undirected_keys(edges: np.ndarray, num_vertices: int) -> np.ndarray:
    """int64 key per edge independent of direction: min * V + max."""
    lo = np.minimum(edges[:, 0], edges[:, 1]).astype(np.int64)
    hi = np.maximum(edges[:, 0], edges[:, 1]).astype(np.int64)
    return lo * np.int64(num_vertices) + hi


def edge_face_counts(faces: np.ndarray, num_vertices: int):
    """(keys [3F], inverse [3F] into unique edges, counts [E]): how many faces use each undirected edge."""
    keys = undirected_keys(half_edges(faces), num_vertices)
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return keys, inv, counts


def face_components(faces: np.ndarray, num_vertices: int) -> tuple[int, np.ndarray]:
    """Connected components of faces that share a vertex: (count, label per face [F])."""
    if len(faces) == 0:
        return 0, np.zeros(0, np.int64)
    e = half_edges(faces)
    g = sp.coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(num_vertices, num_vertices))
    _, vlabel = connected_components(g, directed=False)
    # relabel by first face so labels are deterministic and dense over used vertices only
    flabel = vlabel[faces[:, 0]]
    _, first, dense = np.unique(flabel, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # component numbered by the order of its first face
    return len(first), order[dense].astype(np.int64)


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[F] triangle areas (float64 for robustness on tiny faces)."""
    t = vertices[faces].astype(np.float64)
    return 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)


def compact(vertices: np.ndarray, faces: np.ndarray, *extra: np.ndarray | None):
    """Drop unreferenced vertices: (vertices, faces, *extra per-vertex arrays, kept vertex index [V'])."""
    used = np.zeros(len(vertices), bool)
    used[faces.reshape(-1)] = True
    keep = np.nonzero(used)[0]
    remap = np.full(len(vertices), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    out = [vertices[keep], remap[faces]]
    out += [None if a is None else a[keep] for a in extra]
    return (*out, keep)


def _unique_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique over the rows of an int array [N, K] (N > 0): (first occurrence of each distinct row, inverse [N])."""
    lo, hi = keys.min(0), keys.max(0)
    span = (hi - lo + 1).astype(object)
    # one int64 key when the ranges fit (fast path, ~10x faster than np.unique(axis=0) on millions of rows)
    if np.prod(span) < 2 ** 62:
        k = np.zeros(len(keys), np.int64)
        for j in range(keys.shape[1]):
            k = k * np.int64(span[j]) + (keys[:, j] - lo[j]).astype(np.int64)
        _, first, inv = np.unique(k, return_index=True, return_inverse=True)
    else:
        _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, inv.reshape(-1)


def unique_rows_first(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row of an int array [N, K], in original order."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    return np.sort(_unique_rows(keys)[0])


def group_rows(keys: np.ndarray) -> np.ndarray:
    """For an int array [N, K]: id [N] of each row's group (rows equal <=> same id), ids = first occurrence order."""
    first, inv = _unique_rows(keys)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]
