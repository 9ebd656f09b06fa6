"""Submanifold 3x3x3 sparse convolution in plain torch: the readable reference and the CPU/MPS path.

Semantics (SPEC.md section 7, FlexGEMM ``sparse_submanifold_conv3d``): output sites = input sites, and

    out[n] = bias + sum_{i,j,k in 0..2} W[:, i, j, k, :] @ feats[nbr(n; i-1, j-1, k-1)]

where ``nbr(n; dx, dy, dz)`` is the row whose coords are ``(b_n, x_n+dx, y_n+dy, z_n+dz)``; a missing
neighbour contributes zero. Kernel axis 0 <-> x (coords column 1), axis 1 <-> y, axis 2 <-> z. This equals a
dense ``F.conv3d(grid, W.permute(0, 4, 1, 2, 3), padding=1)`` evaluated at the active voxels.

The neighbour map is a plain ``[N, 27]`` int32 table (row numbers; 108 bytes per voxel), column
``k = i*9 + j*3 + kz`` (the row-major flattening of the kernel's ``[3, 3, 3]`` axes, so
``W.reshape(Co, 27, Ci)[:, k]`` is the matching weight slice), ``-1`` = missing. It depends only on the
coordinates, so callers build it once per spatial level and reuse it.
"""

from __future__ import annotations

import torch

# Gathered rows are the only large temporary: [chunk, 27, Ci]. 256 MiB keeps the peak small next to the
# activations of a 1-14M voxel level (e.g. 64 ch fp16: ~75k rows per chunk) while each matmul stays big
# enough ([75k, 1728] x [1728, Co]) to run near full speed.
DEFAULT_MAX_BYTES = 256 * 2**20

KERNEL_VOLUME = 27


def _kernel_offsets(device: torch.device) -> torch.Tensor:
    """[27, 3] int64 (dx, dy, dz) in neighbour-column order k = i*9 + j*3 + kz, offsets = index - 1."""
    r = torch.arange(3, device=device) - 1
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(KERNEL_VOLUME, 3)


def build_neighbours(coords: torch.Tensor) -> torch.Tensor:
    """Exact 3x3x3 neighbour map of a set of voxels.

    coords: [N, 4] int32 (batch, x, y, z), non-negative, no duplicate rows (a duplicated voxel resolves to one
            of its copies). Any row order.
    returns [N, 27] int32: ``nbr[n, i*9 + j*3 + k]`` = row of voxel ``(b, x+i-1, y+j-1, z+k-1)`` or -1.

    Each voxel becomes one flat int64 key ``((b*X + x)*Y + y)*Z + z`` over a grid padded by one voxel on each
    side, so a neighbour's key is the voxel's key plus a constant per offset and never wraps into another row
    or batch item. Keys are sorted once; each of the 27 offsets is one ``searchsorted``. No dense grid.
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"build_neighbours: coords must be [N, 4] (batch, x, y, z); got shape {tuple(coords.shape)}")
    n = coords.shape[0]
    device = coords.device
    if n == 0:
        return torch.empty(0, KERNEL_VOLUME, dtype=torch.int32, device=device)
    c = coords.long()
    lo, hi = torch.stack([c.amin(0), c.amax(0)]).tolist()  # one host sync per level, not per voxel
    if min(lo) < 0:
        raise ValueError(f"build_neighbours: coords must be non-negative; got per-column minimum {lo}")
    ext = [h + 3 for h in hi[1:]]  # x+1 shifted into [1, max+1]; neighbours span [0, max+2]
    if (hi[0] + 1) * ext[0] * ext[1] * ext[2] >= 2**62:
        raise ValueError(f"build_neighbours: grid too large for int64 keys (max coords {hi})")
    sy, sx = ext[2], ext[1] * ext[2]
    keys = ((c[:, 0] * ext[0] + c[:, 1] + 1) * ext[1] + c[:, 2] + 1) * ext[2] + c[:, 3] + 1
    sorted_keys, order = torch.sort(keys)
    off = _kernel_offsets(device)
    deltas = (off[:, 0] * sx + off[:, 1] * sy + off[:, 2]).tolist()

    if n >= 2**31:
        raise ValueError(f"build_neighbours: {n} voxels do not fit the int32 neighbour map (at most 2^31 - 1)")
    nbr = torch.empty(n, KERNEL_VOLUME, dtype=torch.int32, device=device)
    # Loop over the 27 kernel offsets (not voxels) so the temporaries stay at [N] instead of [N, 27].
    for k, d in enumerate(deltas):
        query = keys + d
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
        found = sorted_keys[pos] == query
        nbr[:, k] = torch.where(found, order[pos], -1)
    return nbr


def _chunk_rows(ci: int, elem_bytes: int, max_bytes: int) -> int:
    return max(1, max_bytes // (KERNEL_VOLUME * max(ci, 1) * elem_bytes))


def check_conv_args(feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    """(M output rows, Ci, Co) of a submanifold_conv3d call; ValueError naming the argument whose shape or dtype is
    wrong. M = N for a whole level; rows r0:r1 of a level's map compute those output rows only.

    Shared by every backend, so they accept exactly the same calls.
    """
    if feats.dim() != 2:
        raise ValueError(f"submanifold_conv3d: feats must be [N, Ci]; got shape {tuple(feats.shape)}")
    n, ci = feats.shape
    if weight.dim() != 5 or tuple(weight.shape[1:4]) != (3, 3, 3) or weight.shape[4] != ci:
        raise ValueError(
            f"submanifold_conv3d: weight must be [Co, 3, 3, 3, Ci={ci}] (official layout); got {tuple(weight.shape)}"
        )
    if neighbours.dim() != 2 or neighbours.shape[1] != KERNEL_VOLUME:
        raise ValueError(
            f"submanifold_conv3d: neighbours must be [M, 27] (M = N={n} for a whole level, or a slice of its rows); "
            f"got {tuple(neighbours.shape)}"
        )
    if weight.dtype != feats.dtype:
        raise ValueError(f"submanifold_conv3d: weight dtype {weight.dtype} != feats dtype {feats.dtype}; cast one of them")
    return neighbours.shape[0], ci, weight.shape[0]


def submanifold_conv3d(
    feats: torch.Tensor,
    neighbours: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Submanifold 3x3x3 convolution on the rows of ``feats`` given their neighbour map.

    feats:      [N, Ci] float (fp32 / fp16 / bf16)
    neighbours: [N, 27] int32 (or int64) from ``build_neighbours`` (-1 = missing), or rows r0:r1 of it: the output
                rows of those voxels only ([M, 27] -> [M, Co]; what a caller chunking a level's output does)
    weight:     [Co, 3, 3, 3, Ci], same dtype as feats (the official state_dict layout)
    bias:       [Co] or None
    chunk_rows: rows per chunk; None picks it so the gathered block ``[chunk, 27, Ci]`` fits ``max_bytes``.
    returns     [M, Co] in feats.dtype (M = N for the whole map).

    Per chunk: gather the 27 neighbour rows, zero the missing ones, then one ``[chunk, 27*Ci] @ [27*Ci, Co]``
    matmul. Accumulation is fp32 for half inputs: on CUDA cuBLAS half GEMMs accumulate in fp32; elsewhere the
    chunk is upcast to fp32 (CPU half matmul is slow and its accumulation type is not guaranteed).
    """
    n, ci, co = check_conv_args(feats, neighbours, weight)
    out_dtype = feats.dtype
    compute_dtype = feats.dtype
    if feats.dtype in (torch.float16, torch.bfloat16) and feats.device.type != "cuda":
        compute_dtype = torch.float32
    w = weight.reshape(co, KERNEL_VOLUME * ci).to(compute_dtype).t()  # [27*Ci, Co], row k*Ci + c
    b = None if bias is None else bias.to(compute_dtype)
    out = torch.empty(n, co, dtype=out_dtype, device=feats.device)
    if n == 0:
        return out
    step = chunk_rows or _chunk_rows(ci, torch.finfo(compute_dtype).bits // 8, max_bytes)
    for r0 in range(0, n, step):
        idx = neighbours[r0 : r0 + step]
        missing = idx < 0
        g = feats[idx.clamp(min=0)]  # [c, 27, Ci]
        g.masked_fill_(missing.unsqueeze(-1), 0)
        g = g.reshape(idx.shape[0], KERNEL_VOLUME * ci).to(compute_dtype)
        res = torch.addmm(b, g, w) if b is not None else g @ w
        out[r0 : r0 + step] = res
    return out


def _child_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[8, 27] int64 each: for child s of a parent and neighbour offset k, the parent-level offset the neighbour
    lies in (column of the parent's map) and which child of that parent it is.

    Per axis the child sits at 2P + o (o = the child's bit) and its neighbour at 2P + o + d, d in {-1, 0, 1}:
    t = o + d in {-1, 0, 1, 2} lies in parent P + floor(t / 2) as child bit t & 1."""
    s = torch.arange(8, device=device)
    o = torch.stack([s & 1, (s >> 1) & 1, (s >> 2) & 1], dim=1)  # [8, 3] x = bit 0, y = bit 1, z = bit 2
    t = o[:, None, :] + _kernel_offsets(device)[None, :, :]  # [8, 27, 3]
    dp, bit = torch.div(t, 2, rounding_mode="floor") + 1, t & 1
    return dp[..., 0] * 9 + dp[..., 1] * 3 + dp[..., 2], bit[..., 0] | (bit[..., 1] << 1) | (bit[..., 2] << 2)


def neighbours_from_parent(
    parent_neighbours: torch.Tensor, parent: torch.Tensor, child: torch.Tensor, chunk_rows: int = 1 << 18
) -> torch.Tensor:
    """The neighbour map of a subdivided level, derived from its parent level's map (no sort, no search).

    parent_neighbours: [Np, 27] int32 (or int64), ``build_neighbours`` of the parent voxels.
    parent, child:     [Nf] int64: fine row f is child ``child[f]`` (x = bit 0, y = bit 1, z = bit 2) of parent
                       row ``parent[f]``, i.e. its coords are 2 * parent's + the child's offset; no child twice.
    returns            [Nf, 27] int32, equal to ``build_neighbours(fine coords)``.

    A fine voxel's neighbours are children of its parent's neighbours (or of the parent itself), so each entry
    is two table reads. Rows are processed ``chunk_rows`` at a time (temporaries [chunk, 27]).
    """
    n_parent, nf = parent_neighbours.shape[0], parent.shape[0]
    device = parent_neighbours.device
    if parent_neighbours.shape[1:] != (KERNEL_VOLUME,) or child.shape != parent.shape:
        raise ValueError(
            f"neighbours_from_parent: need parent map [Np, 27] and parent/child [Nf]; got "
            f"{tuple(parent_neighbours.shape)}, {tuple(parent.shape)}, {tuple(child.shape)}"
        )
    if nf >= 2**31:
        raise ValueError(f"neighbours_from_parent: {nf} voxels do not fit the int32 neighbour map (at most 2^31 - 1)")
    slot = torch.full((n_parent * 8,), -1, dtype=torch.int32, device=device)  # (parent, child) -> fine row
    slot[parent * 8 + child] = torch.arange(nf, dtype=torch.int32, device=device)
    column, which = _child_tables(device)
    out = torch.empty(nf, KERNEL_VOLUME, dtype=torch.int32, device=device)
    for r0 in range(0, nf, chunk_rows):
        p, c = parent[r0 : r0 + chunk_rows], child[r0 : r0 + chunk_rows]
        pn = parent_neighbours[p[:, None], column[c]].long()  # [r, 27] parent row holding each neighbour, or -1
        found = slot[(pn * 8 + which[c]).clamp_(min=0)]
        out[r0 : r0 + chunk_rows] = found.masked_fill_(pn < 0, -1)
    return out
