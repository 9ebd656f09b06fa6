"""Sparse trilinear sampling of voxel attributes (SPEC 15 step 4) against a plain per-point reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.ovoxel.attributes import VoxelAttributeField, sample_voxel_attributes, world_to_grid


def _reference(coords, attrs, g):
    """SPEC 15 step 4 written out point by point."""
    table = {tuple(c): attrs[i] for i, c in enumerate(coords.tolist())}
    out = torch.zeros(len(g), attrs.shape[1], dtype=torch.float64)
    for p, q in enumerate(g.tolist()):
        base = [math.floor(x - 0.5) for x in q]
        acc, wsum = torch.zeros(attrs.shape[1], dtype=torch.float64), 0.0
        for d in itertools.product((0, 1), repeat=3):
            c = tuple(b + o for b, o in zip(base, d))
            if c in table:
                w = math.prod(1 - abs(q[a] - c[a] - 0.5) for a in range(3))
                acc += w * table[c].double()
                wsum += w
        out[p] = acc / wsum if wsum > 0 else 0
    return out


def test_matches_reference_on_sparse_random_voxels():
    gen = torch.Generator().manual_seed(0)
    full = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = full[torch.randperm(len(full), generator=gen)[:120]]          # sparse, unsorted
    attrs = torch.rand(len(coords), 5, generator=gen, dtype=torch.float64)
    g = torch.rand(400, 3, generator=gen, dtype=torch.float64) * 7.0 - 0.5  # inside, on the rim and outside
    g[:10] = coords[:10].double() + 0.5                                     # exactly at voxel centres
    got = sample_voxel_attributes(coords.int(), attrs, g, chunk=97)         # odd chunk: exercises chunking
    torch.testing.assert_close(got, _reference(coords, attrs, g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:10], attrs[:10])                        # centre -> the voxel's own value


def test_linear_field_is_reproduced_inside_and_renormalised_at_the_rim():
    r = 8
    coords = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    lin = lambda p: 0.1 * p[:, :1] - 0.05 * p[:, 1:2] + 0.02 * p[:, 2:3]  # noqa: E731
    attrs = lin(coords.double() + 0.5)
    g = torch.rand(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (r - 1) + 0.5
    torch.testing.assert_close(sample_voxel_attributes(coords, attrs, g), lin(g), rtol=1e-9, atol=1e-12)
    # near the rim only present corners count, renormalised: a constant field stays constant (no fade to 0)
    rim = torch.tensor([[0.1, 0.2, 0.3], [7.9, 7.7, 0.05]], dtype=torch.float64)
    const = sample_voxel_attributes(coords, torch.full((len(coords), 1), 0.8, dtype=torch.float64), rim)
    torch.testing.assert_close(const, torch.full((2, 1), 0.8, dtype=torch.float64))
    far = sample_voxel_attributes(coords, attrs, torch.tensor([[20.0, 1.0, 1.0]], dtype=torch.float64))
    assert float(far.abs().max()) == 0.0


def test_batch_column_world_to_grid_and_errors():
    coords = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3]], dtype=torch.int32)
    attrs = torch.tensor([[1.0], [3.0]])
    field = VoxelAttributeField(coords, attrs)
    mid = world_to_grid(torch.tensor([[2.0 / 64 - 0.5, 2.5 / 64 - 0.5, 3.5 / 64 - 0.5]]), 64)
    torch.testing.assert_close(field.sample(mid), torch.tensor([[2.0]]))
    with pytest.raises(InputError, match="duplicate"):
        VoxelAttributeField(torch.tensor([[1, 1, 1], [1, 1, 1]]), torch.zeros(2, 1))
    with pytest.raises(InputError, match="several batch items"):
        VoxelAttributeField(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.zeros(2, 1))
    with pytest.raises(InputError, match="attrs"):
        VoxelAttributeField(torch.tensor([[1, 1, 1]]), torch.zeros(2, 1))
    with pytest.raises(InputError, match=">= 0"):
        VoxelAttributeField(torch.tensor([[-1, 1, 1]]), torch.zeros(1, 1))
