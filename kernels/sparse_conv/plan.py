"""Row tiles of a submanifold conv that share their neighbour offsets: what the Triton kernel skips (plain torch).

On a surface about 60% of the 27 neighbours of a voxel exist, but a tile of 128 rows in the decoder's order
(parent-major, spatially compact) almost always needs every offset somewhere, so a kernel that skips an offset
only when the whole tile lacks it runs ~all 27. Sorting rows by their 27-bit neighbour mask makes tiles whose
rows lack the same offsets; sorting only within consecutive windows of ``window`` rows keeps each tile's
neighbours in one region of the grid (its gathers hit L2) while still grouping the masks.

The plan depends only on the neighbour map (cache it with the map). The kernel reads:
  rows   [N] int32      row of the input/output that sorted position i stands for (a permutation)
  nbr    [N, 27] int32  the neighbour map in sorted order (values are original row numbers, -1 missing)
  taps   [T, 27] int32  per tile, its needed offsets first (ascending), then the rest
  counts [T] int32      per tile, how many offsets it needs
"""

from __future__ import annotations

import dataclasses

import torch

KERNEL_VOLUME = 27


@dataclasses.dataclass(frozen=True)
class TilePlan:
    block_m: int
    rows: torch.Tensor
    nbr: torch.Tensor
    taps: torch.Tensor
    counts: torch.Tensor

    def check(self, rows: int) -> None:
        """ValueError unless this plan is for a neighbour map of ``rows`` rows."""
        if self.nbr.shape[0] != rows:
            raise ValueError(f"submanifold_conv3d: plan is for {self.nbr.shape[0]} rows, neighbours has {rows}")

    @property
    def work_fraction(self) -> float:
        """Share of (tile, offset) pairs the kernel runs (1.0 = all 27 everywhere). Reads back to the host."""
        return self.counts.sum().item() / max(1, KERNEL_VOLUME * self.counts.numel())


def build_tile_plan(neighbours: torch.Tensor, block_m: int = 128, window: int = 4096) -> TilePlan:
    """Plan for ``neighbours`` [N, 27] (``build_neighbours``): rows sorted by neighbour mask within windows of
    ``window`` consecutive rows (window <= 0: the whole map), cut into tiles of ``block_m`` rows."""
    if neighbours.dim() != 2 or neighbours.shape[1] != KERNEL_VOLUME:
        raise ValueError(f"build_tile_plan: neighbours must be [N, 27]; got {tuple(neighbours.shape)}")
    if block_m < 1:
        raise ValueError(f"build_tile_plan: block_m must be >= 1; got {block_m}")
    n, dev = neighbours.shape[0], neighbours.device
    present = neighbours >= 0
    bits = (present.long() << torch.arange(KERNEL_VOLUME, device=dev)).sum(1)
    if window > 0:
        bits = bits + (torch.arange(n, device=dev) // window << KERNEL_VOLUME)
    order = torch.argsort(bits, stable=True)
    tiles = -(-n // block_m)
    pad = tiles * block_m - n
    need = torch.cat([present[order], present.new_zeros(pad, KERNEL_VOLUME)]).reshape(tiles, block_m, -1).any(1)
    taps = torch.argsort((~need).to(torch.int8), dim=1, stable=True)  # needed offsets first, ascending
    return TilePlan(
        block_m=block_m,
        rows=order.to(torch.int32),
        nbr=neighbours[order].to(torch.int32).contiguous(),
        taps=taps.to(torch.int32).contiguous(),
        counts=need.sum(1).to(torch.int32),
    )
