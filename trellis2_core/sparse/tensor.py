"""SparseTensor: features on the active voxels of a batch of 3D grids.

Conventions (SPEC.md section 2):
  feats  [N, C]  any float dtype
  coords [N, 4]  int32, columns (batch, x, y, z); rows of one batch item are contiguous and items appear
                 in increasing batch order. Coordinates are non-negative grid indices.

A SparseTensor also carries a cache (neighbour maps, subdivision tables) that belongs to its *coordinates*:
``replace(feats)`` returns a tensor with new features on the same coordinates and shares the cache, so the
neighbour map of a level is built once and reused by every convolution at that level. The cache is a
memo of pure functions of the coordinates; sharing it never changes a result.
"""

from __future__ import annotations

from typing import Any

import torch


class SparseTensor:
    __slots__ = ("feats", "coords", "_cache")

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, *, cache: dict[str, Any] | None = None):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"SparseTensor coords must be [N, 4] (batch, x, y, z); got shape {tuple(coords.shape)}")
        if coords.dtype != torch.int32:
            raise ValueError(f"SparseTensor coords must be int32; got {coords.dtype}. Use coords.int().")
        if feats.dim() < 1 or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"SparseTensor feats must have one row per coordinate: feats {tuple(feats.shape)} vs coords {tuple(coords.shape)}"
            )
        if feats.device != coords.device:
            raise ValueError(f"feats on {feats.device} but coords on {coords.device}; move both to one device")
        self.feats = feats
        self.coords = coords
        self._cache = {} if cache is None else cache

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return f"SparseTensor(feats={tuple(self.feats.shape)} {self.feats.dtype}, coords={tuple(self.coords.shape)}, device={self.device})"

    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> SparseTensor:
        """New features on the same coordinates (cache shared), or on new coordinates (fresh cache)."""
        if coords is None:
            return SparseTensor(feats, self.coords, cache=self._cache)
        return SparseTensor(feats, coords)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Features cast to ``dtype`` and everything moved to ``device``. Same device keeps the cache.

        "Same" is decided on the concrete device a tensor would land on ("cuda" means "cuda:0" when that is the
        current device): comparing torch.device("cuda") with a tensor's "cuda:0" would drop the cache and, with it,
        the encoder's subdivision records the texturing path depends on.
        """
        if device is None or torch.empty(0, device=device).device == self.device:
            return SparseTensor(self.feats.to(dtype=dtype), self.coords, cache=self._cache)
        return SparseTensor(self.feats.to(device=device, dtype=dtype), self.coords.to(device))

    # ----------------------------------------------------------------------------------------------- cache
    def get_cache(self, key: str, default: Any = None) -> Any:
        return self._cache.get(key, default)

    def set_cache(self, key: str, value: Any) -> None:
        self._cache[key] = value

    # ----------------------------------------------------------------------------------------------- batch
    @property
    def batch_size(self) -> int:
        return len(self.batch_offsets()) - 1

    def batch_offsets(self) -> list[int]:
        """Row offsets of each batch item: item b owns rows ``[off[b], off[b+1])``. Host ints, cached.

        Batch indices must be contiguous ascending; an item with no voxels is allowed (empty range).
        """
        off = self._cache.get("batch_offsets")
        if off is None:
            b = self.coords[:, 0]
            if b.numel() == 0:
                off = [0, 0]
            else:
                if b.numel() > 1 and bool((b[1:] < b[:-1]).any()):
                    raise ValueError("SparseTensor rows must be grouped by batch index in increasing order")
                n_items = int(b[-1].item()) + 1
                counts = torch.bincount(b.long(), minlength=n_items).tolist()
                off = [0]
                for c in counts:
                    off.append(off[-1] + c)
            self._cache["batch_offsets"] = off
        return off

    def batch_item(self, b: int) -> SparseTensor:
        """Rows of batch item ``b`` (coords keep their batch column)."""
        off = self.batch_offsets()
        return SparseTensor(self.feats[off[b] : off[b + 1]], self.coords[off[b] : off[b + 1]])


def batch_items(x: torch.Tensor | SparseTensor) -> int:
    """Number of batch items of a dense [B, ...] tensor or a SparseTensor."""
    return x.batch_size if isinstance(x, SparseTensor) else x.shape[0]
