"""SLatFlowModel: the sparse DiT of stages 2 (shape) and 3 (texture) (SPEC 3, 5).

Forward ``(x: SparseTensor [N, in], t [B] (= 1000 * t), cond [B, L, Cc], concat_cond: SparseTensor | None)
-> SparseTensor [N, out]`` on x's coordinates. The texture model (in_channels 64) takes
``feats = cat([noisy texture latent, concat_cond feats])`` — noise FIRST, normalised shape latent second.

Self-attention is full attention within each batch item; cross-attention of item b sees ``cond[b]`` only.
When all items have the same number of voxels (B = 1, or the guidance pair on shared coordinates) the tokens
are viewed as a dense [B, L, C] batch and take the batched attention path; otherwise they stay packed and
attention runs per item. ``resolution`` is not used by the forward (as in the reference).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InputError
from ..nn.attention import VarLen
from ..nn.rope import rope_phases
from ..sparse import SparseTensor
from .sparse_structure_flow import FlowDiT, FlowDiTConfig


@dataclasses.dataclass(frozen=True)
class SLatFlowConfig(FlowDiTConfig):
    """Official args of SLatFlowModel / ElasticSLatFlowModel (see FlowDiTConfig)."""


class SLatFlowModel(FlowDiT):
    """Sparse structured-latent flow DiT (RoPE phases from the voxel coordinates at run time)."""

    Config = SLatFlowConfig

    def token_phases(self, x: SparseTensor) -> torch.Tensor:
        """complex64 [N, head_dim/2] RoPE phases of x's voxels, memoised in x's coordinate cache."""
        cfg = self.config
        key = f"trellis2.rope_phases.hd{cfg.head_dim}.f{cfg.rope_freq[0]}-{cfg.rope_freq[1]}"
        phases = x.get_cache(key)
        if phases is None:
            phases = rope_phases(x.coords[:, 1:], cfg.head_dim, rope_freq=cfg.rope_freq)
            x.set_cache(key, phases)
        return phases

    @staticmethod
    def varlen_layout(x: SparseTensor) -> VarLen:
        """The packed-batch layout of x (memoised in x's coordinate cache)."""
        layout = x.get_cache("trellis2.varlen_layout")
        if layout is None:
            layout = VarLen.from_offsets(x.batch_offsets(), x.device)
            x.set_cache("trellis2.varlen_layout", layout)
        return layout

    def prepare_inputs(self, x: SparseTensor) -> None:
        """Build what a first forward on x creates and caches on its coordinates (batch offsets, read back to the
        host; RoPE phases; the packed layout of unequal items), so that the forward can be CUDA-graph captured."""
        offsets = x.batch_offsets()
        self.token_phases(x)
        if len({e - s for s, e in zip(offsets[:-1], offsets[1:])}) > 1:
            self.varlen_layout(x)

    def forward(
        self,
        x: SparseTensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        concat_cond: SparseTensor | None = None,
        zero_cond_from: int | None = None,
    ) -> SparseTensor:
        """x [N, in] (or [N, in - Cconcat] with concat_cond), t [B], cond [B, L, Cc] -> SparseTensor [N, out]
        (x's dtype, same coordinates and cache). zero_cond_from: cond[zero_cond_from:] is all zeros (the
        sampler's negative condition), so their cross-attention is skipped (``CrossAttention.forward``)."""
        cfg = self.config
        if not isinstance(x, SparseTensor):
            raise InputError(f"x: expected a SparseTensor of noisy latents; got {type(x).__name__}")
        feats = x.feats
        if concat_cond is not None:
            if not isinstance(concat_cond, SparseTensor) or concat_cond.feats.shape[0] != feats.shape[0]:
                got = tuple(concat_cond.shape) if isinstance(concat_cond, SparseTensor) else type(concat_cond).__name__
                raise InputError(
                    f"concat_cond: expected a SparseTensor with one row per voxel of x ({feats.shape[0]} rows, same "
                    f"coordinates); got {got}"
                )
            feats = torch.cat([feats, concat_cond.feats.to(feats.dtype)], dim=-1)  # noise first (SPEC 3.6)
        if feats.dim() != 2 or feats.shape[1] != cfg.in_channels:
            hint = "" if concat_cond is not None else " (the texture model also needs concat_cond = the shape latent)"
            raise InputError(
                f"x: the model takes {cfg.in_channels} input channels; got feats {tuple(feats.shape)}"
                f"{' after concatenating concat_cond' if concat_cond is not None else ''}{hint}"
            )
        offsets = x.batch_offsets()
        b, n = len(offsets) - 1, offsets[-1]
        t = self._check_t_cond(t, cond, b, x.device)

        h = self.input_layer(feats.float()).to(self.dtype)  # [N, C]
        mod = self._modulation(t)
        cond = cond.to(self.dtype)
        phases = self.token_phases(x)
        lengths = {e - s for s, e in zip(offsets[:-1], offsets[1:])}
        if len(lengths) == 1 and n > 0:
            # Equal lengths: a free view as a dense batch -> one batched SDPA call per attention.
            length = n // b
            h, phases, varlen = h.view(b, length, -1), phases.view(b, length, -1), None
        else:
            varlen = self.varlen_layout(x)
        for block in self.blocks:
            h = block(h, mod, cond, phases, varlen, zero_from=zero_cond_from)
        out = self._head(h.reshape(n, -1))
        return x.replace(out.to(x.feats.dtype))
