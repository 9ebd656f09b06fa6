"""Row-chunked ConvNeXt blocks for the SC-VAE decoders: same result, a fraction of the peak memory.

A ``SparseConvNeXtBlock3d`` at level i computes ``x + mlp(LN(conv(x)))`` on N_i voxels of C_i channels. Its
largest temporaries are row-wise: the fp32 LayerNorm copies (2 x N*C*4 bytes) and the MLP's hidden layer
and SiLU output (2 x N*4C*2 bytes in fp16), ~22 N*C bytes next to the 2 N*C bytes of x. Computed in chunks of
``rows`` voxels into one preallocated output, the block holds x, conv(x) and the output (6 N*C bytes) plus
one chunk's temporaries. Every row goes through exactly the same operations, so results equal the unchunked
block up to float rounding: a GEMM over fewer rows may take another kernel (fp32 on CPU, the golden decoders
differ by ~5e-7 relative; the tests bound it at 2e-6; subdivision decisions are identical).

The convolutions need not be chunked here: the torch backend already bounds its gathered block
(``kernels/sparse_conv/reference.py``, 256 MiB) and the triton backend holds no temporary.

An up block (``SparseResBlockC2S3d``) peaks before its conv2: the fine tensor h [Nf, Co], the skip branch, and the
fp32 LayerNorm copies of h (2 x Nf*Co*4 bytes) with the SiLU result, ~(3e + 8) Nf*Co bytes for e-byte features:
at 1024^3 the decoders' largest single term. Chunked, LN + SiLU run over ``rows`` fine voxels at a time and
overwrite h in place (h is a fresh tensor that channel2spatial made and nothing else holds), so the stage holds
h, the skip and conv2's output plus one chunk's temporaries. Chunked, its conv1 also runs ``rows // 8`` parents at a
time (a row slice of the level's neighbour map), each slice's [n, 8*Co] output going straight to its children in
one preallocated h, and the skip is added in place from x's [Nf, C/8] channels instead of being repeated out to
[Nf, Co]: whole, conv1's output and h (~3 Nf*Co*e) were the up block's peak once the fused norms removed the fp32
copies; chunked, h, conv2's output and x remain. Same sums; conv1 runs unplanned there (a tile plan covers a
whole map). Its memory effect on the GPU is not measured yet; the planner still budgets the whole conv1.

On CUDA half features the LayerNorm (+ SiLU) runs as one fused kernel (``kernels/vae_norm``) that holds no fp32
copy, and the up blocks' chunks are written back through its ``out=`` (no chunk-sized temporary at all); the
byte counts above are those of the torch path (CPU, float32, or ``TRELLIS2_VAE_NORM_BACKEND=torch``).

The output head (``SparseUnetVaeDecoder.output_head``: LayerNorm and the output layer in float32 over the finest level)
holds ~(e + 8) N*C bytes whole: on CUDA, where the fused norms hold no float32 copy, it is the decode's peak (H100,
``bench/decoder_probe.py --memory``: ~780 bytes per output voxel with the head whole, chunked or not the blocks).
Chunked, it holds one chunk's copies and the small [N, out] result.

``chunk_decoder(model, rows)`` switches every ConvNeXt block and up block of a decoder (or encoder) to the
chunked forward (up blocks: their ``up`` and ``conv2_input``), and a decoder's head; ``rows=None`` switches back.
It sets instance methods; no parameter, name or state_dict key changes.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from ...kernels import sparse_conv as spconv
from ..sparse import SparseTensor
from ..sparse.conv import neighbour_map
from ..sparse.spatial import Subdivision, channel2spatial, child_cache
from .sparse_unet_vae import SparseConvNeXtBlock3d, SparseResBlockC2S3d, SparseUnetVaeDecoder, _ln32

_ROWS_ATTR = "_trellis2_chunk_rows"


def _chunked_forward(self: SparseConvNeXtBlock3d, x: SparseTensor) -> SparseTensor:
    """``SparseConvNeXtBlock3d.forward`` in row chunks of ``self._trellis2_chunk_rows``."""
    rows = getattr(self, _ROWS_ATTR)
    n = x.feats.shape[0]
    if n <= rows:
        return SparseConvNeXtBlock3d.forward(self, x)
    h = self.conv(x).feats
    out = None
    for r0 in range(0, n, rows):
        part = self.mlp(_ln32(self.norm, h[r0 : r0 + rows])) + x.feats[r0 : r0 + rows]
        if out is None:
            out = torch.empty((n, part.shape[1]), dtype=part.dtype, device=part.device)
        out[r0 : r0 + rows] = part
    return x.replace(out)


def _chunked_head(self: SparseUnetVaeDecoder, feats: torch.Tensor) -> torch.Tensor:
    """``SparseUnetVaeDecoder.output_head`` in row chunks of ``self._trellis2_chunk_rows`` into one preallocated output."""
    rows = getattr(self, _ROWS_ATTR)
    n = feats.shape[0]
    if n <= rows:
        return SparseUnetVaeDecoder.output_head(self, feats)
    out = None
    for r0 in range(0, n, rows):
        part = SparseUnetVaeDecoder.output_head(self, feats[r0 : r0 + rows])
        if out is None:
            out = torch.empty((n, part.shape[1]), dtype=part.dtype, device=part.device)
        out[r0 : r0 + rows] = part
    return out


def _chunked_up(self: SparseResBlockC2S3d, x: SparseTensor, sub: Subdivision) -> SparseTensor:
    """``SparseResBlockC2S3d.up`` with conv1 computed for ``rows // 8`` parents at a time (its [n, 8co] output
    never whole: each slice goes straight to its children in one preallocated [Nf, co]) and the skip added in place
    from x's [Nf, c/8] channels (never repeated out to [Nf, co]). The same sums (conv rows are independent; an add
    is an add), a smaller peak at the finest levels; conv1 runs unplanned here (a tile plan covers whole maps)."""
    rows = getattr(self, _ROWS_ATTR)
    n, nf, co = x.feats.shape[0], sub.parent.shape[0], self.out_channels
    step = max(1, rows // 8)
    if n <= step:
        return SparseResBlockC2S3d.up(self, x, sub)
    xin = x.replace(_ln32(self.norm1, x.feats, silu=True))
    conv1 = self.conv1
    feats, nbr = xin.feats.to(conv1.weight.dtype), neighbour_map(xin)
    # the children of each slice of parents: parents sorted (mask subdivisions) give contiguous runs of fine rows;
    # an encoder's record may list them in another order, then one stable sort groups them
    order = None if bool((sub.parent[1:] >= sub.parent[:-1]).all()) else torch.argsort(sub.parent, stable=True)
    parent = sub.parent if order is None else sub.parent[order]
    bounds = torch.searchsorted(parent, torch.arange(0, n + step, step, device=parent.device).clamp(max=n)).tolist()
    h = None
    for i, r0 in enumerate(range(0, n, step)):
        part = spconv.submanifold_conv3d(feats, nbr[r0 : r0 + step], conv1.weight, conv1.bias)  # [<=step, 8co]
        if h is None:
            h = torch.empty((nf, co), dtype=part.dtype, device=part.device)
        f0, f1 = bounds[i], bounds[i + 1]
        fine = slice(f0, f1) if order is None else order[f0:f1]
        h[fine] = part.reshape(-1, co)[(sub.parent[fine] - r0) * 8 + sub.child[fine]]
        del part
    del xin, feats
    h = SparseTensor(h, sub.fine_coords, cache=child_cache(x, sub))
    out = self.conv2(h.replace(self.conv2_input(h.feats)))
    del h
    small = channel2spatial(x, sub).feats  # [Nf, c/8]
    out.feats.view(nf, small.shape[1], co // small.shape[1]).add_(small[:, :, None])
    return out


def _chunked_conv2_input(self: SparseResBlockC2S3d, feats: torch.Tensor) -> torch.Tensor:
    """``SparseResBlockC2S3d.conv2_input`` in row chunks of ``self._trellis2_chunk_rows``, in place."""
    rows = getattr(self, _ROWS_ATTR)
    for r0 in range(0, feats.shape[0], rows):
        chunk = feats[r0 : r0 + rows]
        _ln32(None, chunk, silu=True, out=chunk)
    return feats


# block type -> (method replaced on the instance, chunked version)
_CHUNKED = {SparseConvNeXtBlock3d: (("forward", _chunked_forward),),
            SparseResBlockC2S3d: (("conv2_input", _chunked_conv2_input), ("up", _chunked_up))}  # fmt: skip


def chunk_decoder(model: nn.Module, rows: int | None) -> int:
    """Run ``model``'s ConvNeXt and up blocks, and a decoder's output head, in chunks of ``rows`` voxels (None:
    unchunked). Returns the modules changed (blocks + 1 for a decoder)."""
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"chunk_decoder: rows must be a positive integer or None; got {rows!r}")
    count = 0
    for module in model.modules():
        entries = (("output_head", _chunked_head),) if isinstance(module, SparseUnetVaeDecoder) else _CHUNKED.get(type(module))
        if entries is None:
            continue
        for name, chunked in entries:
            if rows is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = types.MethodType(chunked, module)
        if rows is None:
            module.__dict__.pop(_ROWS_ATTR, None)
        else:
            module.__dict__[_ROWS_ATTR] = rows
        count += 1
    return count


def decoder_chunk_rows(model: nn.Module) -> int | None:
    """The chunk size ``chunk_decoder`` set on ``model`` (None: unchunked or no ConvNeXt blocks)."""
    for module in model.modules():
        if isinstance(module, SparseConvNeXtBlock3d):
            return module.__dict__.get(_ROWS_ATTR)
    return None


__all__ = ["chunk_decoder", "decoder_chunk_rows"]
