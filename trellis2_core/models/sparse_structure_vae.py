"""Dense sparse-structure VAE of TRELLIS v1 (SPEC.md section 6): a 3D conv encoder/decoder between the 64^3
occupancy grid and the 16^3 x 8 latent the stage-1 flow samples.

Released checkpoints (microsoft/TRELLIS-image-large): ``ss_dec_conv3d_16l8_fp16`` (used by the pipeline) and
``ss_enc_conv3d_16l8_fp16`` (data preparation only). Layout of both (official parameter names):

    input_layer            Conv3d 3x3x3 (fp32)
    blocks.i / middle_block.i   ResBlock3d and Down/UpsampleBlock3d; their convs in the block dtype
                           (fp16 when ``use_fp16``), their norms fp32
    out_layer.0 / .2       ChannelLayerNorm, (SiLU), Conv3d 3x3x3 (fp32)

Tensors are channels-first ``[B, C, X, Y, Z]`` (grid axes x, y, z of the Z-up object cube).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..nn import ops as nn_ops
from .config import ModelConfig

_NORM_TYPES = ("layer", "group")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, *spatial]``; affine, eps 1e-5, always computed in fp32.

    Parameters ``weight`` / ``bias`` ``[C]`` are fp32 whatever the block dtype (the reference keeps norms fp32).
    The output has the input's dtype. Not built from ``ops``: casting ops only matter for the heavy convs, and
    the parameters are moved to the input's device in forward so offloaded copies still work.
    """

    def __init__(self, channels: int, eps: float = 1e-5, *, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1).float()
        w = self.weight.to(device=x.device, dtype=torch.float32)
        b = self.bias.to(device=x.device, dtype=torch.float32)
        h = F.layer_norm(h, (h.shape[-1],), w, b, self.eps)
        return h.movedim(-1, 1).to(x.dtype).contiguous()


class ChannelGroupNorm(nn.GroupNorm):
    """GroupNorm(32 groups) computed in fp32 (``norm_type="group"``; no released checkpoint uses it)."""

    def __init__(self, channels: int, *, device=None):
        if channels % 32:
            raise ConfigError(f"norm_type 'group' needs channels divisible by 32; got {channels}. Use norm_type 'layer'.")
        super().__init__(32, channels, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32)
        b = self.bias.to(device=x.device, dtype=torch.float32)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def norm_layer(norm_type: str, channels: int, *, device=None) -> nn.Module:
    """The channel norm ``norm_type`` names ("layer": ChannelLayerNorm, "group": 32-group GroupNorm)."""
    if norm_type == "layer":
        return ChannelLayerNorm(channels, device=device)
    if norm_type == "group":
        return ChannelGroupNorm(channels, device=device)
    raise ConfigError(f"norm_type must be one of {_NORM_TYPES}; got {norm_type!r}")


class ResBlock3d(nn.Module):
    """``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``; 3x3x3 convs with padding 1, channels unchanged.

    x: ``[B, C, X, Y, Z]`` in the conv dtype -> same shape and dtype.
    """

    def __init__(self, channels: int, norm_type: str = "layer", *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.norm1 = norm_layer(norm_type, channels, device=device)
        self.norm2 = norm_layer(norm_type, channels, device=device)
        self.conv1 = ops.Conv3d(channels, channels, 3, padding=1, device=device, dtype=dtype)
        self.conv2 = ops.Conv3d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``[B, C*f^3, X, Y, Z] -> [B, C, f*X, f*Y, f*Z]`` with
    ``out[b, c, f*X+a, f*Y+e, f*Z+g] = in[b, c*f^3 + a*f^2 + e*f + g, X, Y, Z]`` (SPEC 6)."""
    b, c, x_, y_, z_ = x.shape
    c_out = c // factor**3
    h = x.reshape(b, c_out, factor, factor, factor, x_, y_, z_)
    # interleave each sub-voxel index right after its grid axis: (X, a), (Y, e), (Z, g)
    h = h.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return h.reshape(b, c_out, x_ * factor, y_ * factor, z_ * factor)


class UpsampleBlock3d(nn.Module):
    """Conv3d(ci -> co*8, 3x3x3, padding 1) then 3D pixel shuffle x2: ``[B,ci,X,Y,Z] -> [B,co,2X,2Y,2Z]``."""

    def __init__(self, in_channels: int, out_channels: int, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.conv = ops.Conv3d(in_channels, out_channels * 8, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class DownsampleBlock3d(nn.Module):
    """Conv3d(ci -> co, kernel 2, stride 2): ``[B,ci,X,Y,Z] -> [B,co,X/2,Y/2,Z/2]`` (X, Y, Z even)."""

    def __init__(self, in_channels: int, out_channels: int, *, device=None, dtype=None, ops=None):
        super().__init__()
        ops = nn_ops.resolve(ops)
        self.conv = ops.Conv3d(in_channels, out_channels, 2, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_common(cfg) -> None:
    if not cfg.channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in cfg.channels):
        raise ConfigError(f"channels must be a non-empty list of positive ints; got {list(cfg.channels)}")
    _check_int(cfg.latent_channels, "latent_channels", 1)
    _check_int(cfg.num_res_blocks, "num_res_blocks", 0)
    _check_int(cfg.num_res_blocks_middle, "num_res_blocks_middle", 0)
    if cfg.norm_type not in _NORM_TYPES:
        raise ConfigError(f"norm_type must be one of {_NORM_TYPES}; got {cfg.norm_type!r}")


@dataclasses.dataclass(frozen=True)
class SparseStructureEncoderConfig(ModelConfig):
    """Official constructor args of ``SparseStructureEncoder`` (reference defaults for the optional ones)."""

    in_channels: int
    latent_channels: int
    num_res_blocks: int
    channels: tuple[int, ...]
    num_res_blocks_middle: int = 2
    norm_type: str = "layer"
    use_fp16: bool = False

    def __post_init__(self):
        _check_common(self)
        _check_int(self.in_channels, "in_channels", 1)


@dataclasses.dataclass(frozen=True)
class SparseStructureDecoderConfig(ModelConfig):
    """Official constructor args of ``SparseStructureDecoder`` (reference defaults for the optional ones)."""

    out_channels: int
    latent_channels: int
    num_res_blocks: int
    channels: tuple[int, ...]
    num_res_blocks_middle: int = 2
    norm_type: str = "layer"
    use_fp16: bool = False

    def __post_init__(self):
        _check_common(self)
        _check_int(self.out_channels, "out_channels", 1)


def _block_dtype(cfg, dtype: torch.dtype | None) -> torch.dtype:
    # The reference converts the convs inside blocks / middle_block to fp16 when use_fp16, nothing else.
    if dtype is not None:
        return dtype
    return torch.float16 if cfg.use_fp16 else torch.float32


class SparseStructureEncoder(nn.Module):
    """Occupancy grid ``[B, in_channels, R, R, R]`` -> posterior mean ``[B, latent_channels, R/2^k, ...]`` (fp32),
    with k = len(channels) - 1 (the released one: [B,1,64,64,64] -> [B,8,16,16,16]).

    dtype: precision of ``blocks`` / ``middle_block`` convs (None: fp16 if ``use_fp16`` else fp32); the input and
    output layers and every norm stay fp32.
    """

    Config = SparseStructureEncoderConfig

    def __init__(self, config: SparseStructureEncoderConfig, *, device=None, dtype=None, ops=None):
        super().__init__()
        self.config = config
        self.dtype = _block_dtype(config, dtype)
        ops = nn_ops.resolve(ops)
        ch, nt = config.channels, config.norm_type
        blk = dict(device=device, dtype=self.dtype, ops=ops)
        self.input_layer = ops.Conv3d(config.in_channels, ch[0], 3, padding=1, device=device, dtype=torch.float32)
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c, nt, **blk) for _ in range(config.num_res_blocks))
            if i < len(ch) - 1:
                self.blocks.append(DownsampleBlock3d(c, ch[i + 1], **blk))
        self.middle_block = nn.Sequential(*(ResBlock3d(ch[-1], nt, **blk) for _ in range(config.num_res_blocks_middle)))
        self.out_layer = nn.Sequential(
            norm_layer(nt, ch[-1], device=device),
            nn.SiLU(),
            ops.Conv3d(ch[-1], config.latent_channels * 2, 3, padding=1, device=device, dtype=torch.float32),
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)``, each ``[B, latent_channels, ...]`` fp32."""
        h = self.input_layer(x.float()).to(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h)
        h = self.out_layer(h.float())
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (what the reference uses to encode SS latents: ``sample_posterior=False``)."""
        return self.posterior(x)[0]


class SparseStructureDecoder(nn.Module):
    """Latent ``[B, latent_channels, L, L, L]`` -> logits ``[B, out_channels, L*2^k, ...]`` fp32, k = len(channels) - 1
    (the released one: [B,8,16,16,16] -> [B,1,64,64,64]; occupancy = logits > 0, see ``structure.occupancy_coords``).

    dtype: precision of ``blocks`` / ``middle_block`` convs (None: fp16 if ``use_fp16`` else fp32); the input and
    output layers and every norm stay fp32.
    """

    Config = SparseStructureDecoderConfig

    def __init__(self, config: SparseStructureDecoderConfig, *, device=None, dtype=None, ops=None):
        super().__init__()
        self.config = config
        self.dtype = _block_dtype(config, dtype)
        ops = nn_ops.resolve(ops)
        ch, nt = config.channels, config.norm_type
        blk = dict(device=device, dtype=self.dtype, ops=ops)
        self.input_layer = ops.Conv3d(config.latent_channels, ch[0], 3, padding=1, device=device, dtype=torch.float32)
        self.middle_block = nn.Sequential(*(ResBlock3d(ch[0], nt, **blk) for _ in range(config.num_res_blocks_middle)))
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c, nt, **blk) for _ in range(config.num_res_blocks))
            if i < len(ch) - 1:
                self.blocks.append(UpsampleBlock3d(c, ch[i + 1], **blk))
        self.out_layer = nn.Sequential(
            norm_layer(nt, ch[-1], device=device),
            nn.SiLU(),
            ops.Conv3d(ch[-1], config.out_channels, 3, padding=1, device=device, dtype=torch.float32),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z.float()).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.float())


__all__ = [
    "ChannelLayerNorm",
    "DownsampleBlock3d",
    "ResBlock3d",
    "SparseStructureDecoder",
    "SparseStructureDecoderConfig",
    "SparseStructureEncoder",
    "SparseStructureEncoderConfig",
    "UpsampleBlock3d",
    "pixel_shuffle_3d",
]
