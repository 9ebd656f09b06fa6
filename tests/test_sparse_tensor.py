"""SparseTensor: validation, the coordinate cache, batch layout."""

from __future__ import annotations

import pytest
import torch

from trellis2.trellis2_core.sparse import SparseTensor


def _st(n=5, b=(0, 0, 1, 1, 1)):
    coords = torch.tensor([[bi, i, 0, 0] for i, bi in enumerate(b)], dtype=torch.int32)
    return SparseTensor(torch.randn(n, 3), coords)


def test_replace_shares_the_cache_and_new_coords_do_not():
    x = _st()
    x.set_cache("k", 1)
    assert x.replace(x.feats * 2).get_cache("k") == 1
    assert x.replace(x.feats, x.coords.clone()).get_cache("k") is None


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
def test_to_the_same_device_in_any_spelling_keeps_the_cache(device):
    # "cuda" vs a tensor's "cuda:0" is the real case: dropping the cache loses the encoder's subdivision records
    x = _st()
    x.set_cache("k", 1)
    y = x.to(device, torch.float64)
    assert y.get_cache("k") == 1 and y.dtype == torch.float64


def test_batch_offsets_and_items():
    x = _st()
    assert x.batch_offsets() == [0, 2, 5] and x.batch_size == 2
    assert torch.equal(x.batch_item(1).feats, x.feats[2:])


@pytest.mark.parametrize(
    "feats, coords, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), r"\[N, 4\]"),
        (torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int64), "int32"),
        (torch.zeros(3, 3), torch.zeros(2, 4, dtype=torch.int32), "one row per coordinate"),
    ],
)
def test_bad_construction_names_the_problem(feats, coords, match):
    with pytest.raises(ValueError, match=match):
        SparseTensor(feats, coords)


def test_unsorted_batches_are_refused():
    with pytest.raises(ValueError, match="grouped by batch"):
        _st(b=(1, 0, 0, 1, 1)).batch_offsets()
