"""SC-VAE sparse U-Net: SparseUnetVaeEncoder / SparseUnetVaeDecoder and their blocks (SPEC.md sections 8-9).

Data: SparseTensor feats [N, C], coords [N, 4] int32 (b, x, y, z). Every down block halves the grid (spatial ->
channel), every up block doubles it (channel -> spatial) keeping only the children its subdivision mask selects.

Precision (reference ``use_fp16``): everything inside ``blocks`` that is a Linear or SparseConv3d holds the
block dtype (fp16 as released) and runs in it; LayerNorms keep fp32 affine params and compute in fp32, casting
back; ``input_layer``/``to_latent``/``from_latent``/``output_layer`` and the final non-affine LayerNorm
(eps 1e-5) run in fp32. The decoder's subdivision logits therefore come out of an fp16 Linear, as in the
reference (SPEC.md 17.9: decisions near 0 depend on it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import vae_norm
from ..errors import ConfigError, InputError
from ..nn import ops as nn_ops
from ..sparse import SparseTensor
from ..sparse.conv import SparseConv3d
from ..sparse.spatial import Subdivision, channel2spatial, spatial2channel, subdivision_from_mask, subdivision_from_record
from .config import ModelConfig

_BLOCK_ARGS = {"use_checkpoint"}  # the only key the released configs carry (training-only, accepted and ignored)


def _ln32(
    norm: nn.Module | None,
    feats: torch.Tensor,
    eps: float = 1e-6,
    *,
    silu: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm computed in fp32 and cast back (reference LayerNorm32), then SiLU of that if ``silu``;
    ``norm=None`` means no affine (with ``eps``). ``out``: write the result there (may be ``feats`` itself).

    A plain torch LayerNorm goes through ``kernels.vae_norm`` (one fused pass on CUDA half tensors, the same ops
    as before elsewhere); a norm module that overrides ``forward`` (injected casting ops) applies its own weights.
    """
    if norm is None:
        return vae_norm.layer_norm_32(feats, eps=eps, silu=silu, out=out)
    if type(norm).forward is nn.LayerNorm.forward and tuple(norm.normalized_shape) == tuple(feats.shape[-1:]):
        return vae_norm.layer_norm_32(feats, norm.weight, norm.bias, norm.eps, silu=silu, out=out)
    h = norm(feats.float()).to(feats.dtype)
    h = F.silu(h) if silu else h
    return h if out is None else out.copy_(h)


# ------------------------------------------------------------------------------------------------------ blocks
class SparseConvNeXtBlock3d(nn.Module):
    """out = x + mlp(LN(conv(x))); keys conv, norm, mlp.0, mlp.2. Channels c -> c."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        hidden = int(channels * mlp_ratio)
        self.norm = ops.LayerNorm(channels, eps=1e-6, elementwise_affine=True, device=device, dtype=torch.float32)
        self.conv = SparseConv3d(channels, channels, device=device, dtype=dtype)
        self.mlp = nn.Sequential(
            ops.Linear(channels, hidden, device=device, dtype=dtype),
            nn.SiLU(),
            ops.Linear(hidden, channels, device=device, dtype=dtype),
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv(x).feats
        h = self.mlp(_ln32(self.norm, h))
        return x.replace(h + x.feats)


class SparseResBlockS2C3d(nn.Module):
    """Encoder down block c -> co at half resolution; keys norm1, conv1 [co/8,3,3,3,c], conv2 [co,3,3,3,co]."""

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.channels, self.out_channels = channels, out_channels
        self.norm1 = ops.LayerNorm(channels, eps=1e-6, elementwise_affine=True, device=device, dtype=torch.float32)
        self.conv1 = SparseConv3d(channels, out_channels // 8, device=device, dtype=dtype)
        self.conv2 = SparseConv3d(out_channels, out_channels, device=device, dtype=dtype)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(x.replace(_ln32(self.norm1, x.feats, silu=True)))
        h = spatial2channel(h)  # [Np, co]
        skip = spatial2channel(x).feats  # [Np, 8c] -> mean over consecutive groups of 8c/co channels
        skip = skip.reshape(skip.shape[0], self.out_channels, 8 * self.channels // self.out_channels).mean(dim=-1)
        h = self.conv2(h.replace(_ln32(None, h.feats, silu=True)))
        return h.replace(h.feats + skip)


class SparseResBlockC2S3d(nn.Module):
    """Decoder up block c -> co at double resolution; keys norm1, conv1 [8co,3,3,3,c], conv2 [co,3,3,3,co],
    to_subdiv [8, c] (pred_subdiv only).

    Which children exist, in the reference's order of precedence: the spatial2channel record the input carries
    (texturing: decode onto the encoder's voxels), else ``to_subdiv(x) > 0`` (pred_subdiv), else
    ``guide.feats > 0``.
    """

    def __init__(
        self, channels: int, out_channels: int, use_checkpoint: bool = False, pred_subdiv: bool = True,
        *, device=None, dtype=None, ops=None,
    ):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.channels, self.out_channels, self.pred_subdiv = channels, out_channels, pred_subdiv
        self.norm1 = ops.LayerNorm(channels, eps=1e-6, elementwise_affine=True, device=device, dtype=torch.float32)
        self.conv1 = SparseConv3d(channels, out_channels * 8, device=device, dtype=dtype)
        self.conv2 = SparseConv3d(out_channels, out_channels, device=device, dtype=dtype)
        if pred_subdiv:
            self.to_subdiv = ops.Linear(channels, 8, device=device, dtype=dtype)

    def subdivide(self, x: SparseTensor, guide: SparseTensor | None = None):
        """(Subdivision, logits SparseTensor [Np, 8] at x's coords or None)."""
        logits = None
        if self.pred_subdiv:
            # Fresh cache: the returned logits must not keep this level's neighbour map alive.
            logits = SparseTensor(self.to_subdiv(x.feats), x.coords)
        sub = subdivision_from_record(x)
        if sub is not None:
            return sub, logits
        if logits is not None:
            return subdivision_from_mask(x, logits.feats > 0), logits
        if guide is None:
            raise InputError(
                "SparseUnetVaeDecoder (pred_subdiv=false): no guide_subs given and the latent carries no encoder "
                "record; pass guide_subs (the shape decoder's subdivision logits) or decode an encoder's latent"
            )
        if guide.feats.shape != (len(x), 8) or not torch.equal(guide.coords, x.coords):
            raise InputError(
                f"guide_subs: level with {len(x)} voxels needs logits [{len(x)}, 8] on the same coords; got "
                f"{tuple(guide.feats.shape)}. Pass the subs the shape decoder returned for this same latent."
            )
        return subdivision_from_mask(x, guide.feats > 0), logits

    def forward(self, x: SparseTensor, guide: SparseTensor | None = None) -> tuple[SparseTensor, SparseTensor | None]:
        sub, logits = self.subdivide(x, guide)
        return self.up(x, sub), logits

    def up(self, x: SparseTensor, sub: Subdivision) -> SparseTensor:
        """The children's features [Nf, co]: conv1 of SiLU(LN(x)) spread to the children, conv2 of SiLU(LN(that)),
        plus the skip (x's channels spread to the children, each repeated co/(c/8) times). The chunked variant
        (models/decoder_chunking.py) computes conv1 a slice of parents at a time."""
        h = self.conv1(x.replace(_ln32(self.norm1, x.feats, silu=True)))
        h = channel2spatial(h, sub)  # [Nf, co]
        skip = channel2spatial(x, sub).feats  # [Nf, c/8], each channel repeated co/(c/8) times consecutively
        skip = skip.repeat_interleave(self.out_channels // (self.channels // 8), dim=1)
        h = self.conv2(h.replace(self.conv2_input(h.feats)))
        return h.replace(h.feats + skip)

    def conv2_input(self, feats: torch.Tensor) -> torch.Tensor:
        """SiLU(LN(h)) before conv2 (no affine). ``feats`` is a fresh tensor channel2spatial made: the chunked
        variant (models/decoder_chunking.py) overwrites it in place."""
        return _ln32(None, feats, silu=True)


# ------------------------------------------------------------------------------------------------------ configs
def _check_unet(cfg: Any, resample_field: str, resample_type: str, down: bool) -> None:
    name = type(cfg).__name__
    n = len(cfg.num_blocks)
    if n < 1 or len(cfg.model_channels) != n:
        raise ConfigError(f"{name}: model_channels and num_blocks must have one entry per level; got {cfg.model_channels}, {cfg.num_blocks}")
    for field, want in (("block_type", n), (resample_field, n - 1), ("block_args", n)):
        if len(getattr(cfg, field)) != want:
            raise ConfigError(f"{name}: {field} must have {want} entries; got {len(getattr(cfg, field))}")
    if any(t != "SparseConvNeXtBlock3d" for t in cfg.block_type):
        raise ConfigError(f"{name}: block_type supports only 'SparseConvNeXtBlock3d' (released configs); got {cfg.block_type}")
    if any(t != resample_type for t in getattr(cfg, resample_field)):
        raise ConfigError(f"{name}: {resample_field} supports only {resample_type!r} (released configs); got {getattr(cfg, resample_field)}")
    for args in cfg.block_args:
        keys = set(args) if isinstance(args, dict) else {k for k, _ in args}  # from_args freezes dicts to pairs
        if not keys <= _BLOCK_ARGS:
            raise ConfigError(f"{name}: block_args may only carry {sorted(_BLOCK_ARGS)}; got {sorted(keys)}")
    for c, co in zip(cfg.model_channels[:-1], cfg.model_channels[1:]):
        ok = (co % 8 == 0 and (8 * c) % co == 0) if down else (c % 8 == 0 and co % (c // 8) == 0)
        if not ok:
            raise ConfigError(f"{name}: channels {c} -> {co} cannot be rearranged by a factor-2 {resample_type}")


@dataclasses.dataclass(frozen=True)
class SparseUnetVaeEncoderConfig(ModelConfig):
    in_channels: int
    model_channels: tuple[int, ...]
    latent_channels: int
    num_blocks: tuple[int, ...]
    block_type: tuple[str, ...]
    down_block_type: tuple[str, ...]
    block_args: tuple
    use_fp16: bool = False

    def __post_init__(self):
        _check_unet(self, "down_block_type", "SparseResBlockS2C3d", down=True)


@dataclasses.dataclass(frozen=True)
class SparseUnetVaeDecoderConfig(ModelConfig):
    out_channels: int
    model_channels: tuple[int, ...]
    latent_channels: int
    num_blocks: tuple[int, ...]
    block_type: tuple[str, ...]
    up_block_type: tuple[str, ...]
    block_args: tuple
    use_fp16: bool = False
    pred_subdiv: bool = True

    def __post_init__(self):
        _check_unet(self, "up_block_type", "SparseResBlockC2S3d", down=False)


def _block_dtype(config: Any, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float16 if config.use_fp16 else torch.float32


def _compute_dtype(blocks: nn.Module) -> torch.dtype:
    """Dtype the heavy blocks hold now (first conv/linear weight; 1-D params are fp32 norms or biases)."""
    for p in blocks.parameters():
        if p.dim() > 1:
            return p.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------------ models
class SparseUnetVaeEncoder(nn.Module):
    """Voxel features [N, in] at grid R -> latent mean [Np, latent_channels] at grid R / 2^(levels-1).

    The returned SparseTensor carries, per level, the spatial2channel records a decoder with no guide uses to
    decode back onto exactly these input voxels, in the same row order.
    """

    Config = SparseUnetVaeEncoderConfig

    def __init__(self, config, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.config = config
        bdt = _block_dtype(config, dtype)
        ch = config.model_channels
        self.input_layer = ops.Linear(self._in_channels(config), ch[0], device=device, dtype=torch.float32)
        self.to_latent = ops.Linear(ch[-1], 2 * config.latent_channels, device=device, dtype=torch.float32)
        kw = dict(device=device, dtype=bdt, ops=ops)
        self.blocks = nn.ModuleList()
        for i, n in enumerate(config.num_blocks):
            level = nn.ModuleList(SparseConvNeXtBlock3d(ch[i], **kw) for _ in range(n))
            if i < len(ch) - 1:
                level.append(SparseResBlockS2C3d(ch[i], ch[i + 1], **kw))
            self.blocks.append(level)

    @staticmethod
    def _in_channels(config) -> int:
        return config.in_channels

    def forward(self, x: SparseTensor) -> SparseTensor:
        """x: feats [N, in_channels] float, coords [N, 4] int32. Returns the posterior mean (no sampling)."""
        if x.feats.dim() != 2 or x.feats.shape[1] != self.input_layer.in_features:
            raise InputError(f"{type(self).__name__}: input feats must be [N, {self.input_layer.in_features}]; got {tuple(x.feats.shape)}")
        io = self.input_layer.weight.dtype
        h = x.replace(self.input_layer(x.feats.to(io)).to(_compute_dtype(self.blocks)))
        for level in self.blocks:
            for block in level:
                h = block(h)
        f = F.layer_norm(h.feats.to(io), h.feats.shape[-1:])
        f = self.to_latent(f)
        return h.replace(f[:, : self.config.latent_channels].contiguous())


class SparseUnetVaeDecoder(nn.Module):
    """Latent [N, latent_channels] -> [Nf, out_channels] after len(model_channels)-1 subdivisions.

    forward(x, guide_subs=None, return_subs=False):
      pred_subdiv=True : children where ``to_subdiv`` logits > 0; ``return_subs`` also returns the list of logits
                         SparseTensors [N_level, 8] at each level's parent coords.
      pred_subdiv=False: children where ``guide_subs[level].feats > 0`` (a shape decoder's subs), or, with no
                         guide, the records an encoder left on ``x`` (output = the encoder's input voxels).
    """

    Config = SparseUnetVaeDecoderConfig

    def __init__(self, config, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.config = config
        self.pred_subdiv = self._pred_subdiv(config)
        bdt = _block_dtype(config, dtype)
        ch = config.model_channels
        self.output_layer = ops.Linear(ch[-1], self._out_channels(config), device=device, dtype=torch.float32)
        self.from_latent = ops.Linear(config.latent_channels, ch[0], device=device, dtype=torch.float32)
        kw = dict(device=device, dtype=bdt, ops=ops)
        self.blocks = nn.ModuleList()
        for i, n in enumerate(config.num_blocks):
            level = nn.ModuleList(SparseConvNeXtBlock3d(ch[i], **kw) for _ in range(n))
            if i < len(ch) - 1:
                level.append(SparseResBlockC2S3d(ch[i], ch[i + 1], pred_subdiv=self.pred_subdiv, **kw))
            self.blocks.append(level)

    @staticmethod
    def _out_channels(config) -> int:
        return config.out_channels

    @staticmethod
    def _pred_subdiv(config) -> bool:
        return config.pred_subdiv

    @property
    def num_upsamples(self) -> int:
        return len(self.blocks) - 1

    def _from_latent(self, x: SparseTensor) -> SparseTensor:
        if x.feats.dim() != 2 or x.feats.shape[1] != self.from_latent.in_features:
            raise InputError(f"{type(self).__name__}: latent feats must be [N, {self.from_latent.in_features}]; got {tuple(x.feats.shape)}")
        h = self.from_latent(x.feats.to(self.from_latent.weight.dtype))
        return x.replace(h.to(_compute_dtype(self.blocks)))

    def forward(self, x: SparseTensor, guide_subs: list[SparseTensor] | None = None, return_subs: bool = False):
        if guide_subs is not None:
            if self.pred_subdiv:
                raise InputError("guide_subs: this decoder predicts its own subdivisions (pred_subdiv=true); pass guide_subs=None")
            if len(guide_subs) != self.num_upsamples:
                raise InputError(f"guide_subs: expected {self.num_upsamples} levels of logits; got {len(guide_subs)}")
        if return_subs and not self.pred_subdiv:
            raise InputError("return_subs=True needs a decoder that predicts subdivisions (pred_subdiv=true)")
        h = self._from_latent(x)
        subs = []
        for i, level in enumerate(self.blocks):
            for block in level:
                if isinstance(block, SparseResBlockC2S3d):
                    h, sub = block(h, None if guide_subs is None else guide_subs[i])
                    subs.append(sub)
                else:
                    h = block(h)
        out = h.replace(self.output_head(h.feats))
        return (out, subs) if return_subs else out

    def output_head(self, feats: torch.Tensor) -> torch.Tensor:
        """The output head, per row: non-affine LayerNorm in the output layer's precision (float32 as released), then
        the output layer. [N, C] -> [N, out]. ``models/decoder_chunking.py`` can run it in row chunks: its float32
        copies are the largest tensors of a decode on CUDA (~640 bytes per output voxel at 64 channels)."""
        io = self.output_layer.weight.dtype
        return self.output_layer(F.layer_norm(feats.to(io), feats.shape[-1:]))

    @torch.no_grad()
    def upsample(self, x: SparseTensor, upsample_times: int) -> torch.Tensor:
        """Coords [N, 4] int32 after ``upsample_times`` predicted subdivisions (no output head).

        Runs the levels below ``upsample_times`` in full; of the last up block only its subdivision logits are
        needed, so its convolutions are skipped (same coords, much less work at the finest level).
        """
        if not self.pred_subdiv:
            raise InputError("upsample: needs a decoder that predicts subdivisions (pred_subdiv=true)")
        if not isinstance(upsample_times, int) or not 0 <= upsample_times <= self.num_upsamples:
            raise InputError(f"upsample_times must be an int in [0, {self.num_upsamples}]; got {upsample_times!r}")
        if upsample_times == 0:
            return x.coords
        h = self._from_latent(x)
        for i in range(upsample_times):
            for block in self.blocks[i]:
                if isinstance(block, SparseResBlockC2S3d):
                    if i == upsample_times - 1:
                        return block.subdivide(h)[0].fine_coords
                    h, _ = block(h)
                else:
                    h = block(h)
        raise AssertionError("unreachable: every level below num_upsamples ends with an up block")
