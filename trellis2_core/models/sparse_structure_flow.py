"""SparseStructureFlowModel: the stage-1 dense 3D DiT (SPEC 3, 4), plus the config and trunk both DiTs share.

Forward ``(x [B, 8, R, R, R], t [B] (= 1000 * t), cond [B, L, Cc]) -> v [B, 8, R, R, R]`` (flow velocity).
Tokens are the R^3 grid cells in C order (token = x*R*R + y*R + z); RoPE uses their integer grid indices.

The reference registers the RoPE phases as a persistent buffer ``rope_phases``; here they are recomputed (a
pure function of R and the head dim, cached per device), so ``state_dict()`` holds exactly the checkpoint's
parameters, and a ``rope_phases`` entry in a file is dropped when loading.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..nn.modulation import shared_adaln
from ..nn.ops import resolve
from ..nn.rope import DEFAULT_ROPE_FREQ, grid_coords, rope_phases
from ..nn.timestep import TimestepEmbedder
from ..nn.transformer import ModulatedTransformerCrossBlock
from .config import ModelConfig, parse_dtype

# The reference's str_to_dtype also accepts these short names.
_DTYPE_ALIASES = {"f16": "float16", "fp16": "float16", "bf16": "bfloat16", "f32": "float32", "fp32": "float32"}


@dataclasses.dataclass(frozen=True)
class FlowDiTConfig(ModelConfig):
    """Constructor args shared by SparseStructureFlowModel and SLatFlowModel (same names and defaults).

    Unsupported by design (no TRELLIS.2 checkpoint uses them): ``pe_mode`` other than "rope" and
    ``share_mod`` false. ``use_checkpoint`` (training) and ``initialization`` (weights are loaded) do not
    change inference.
    """

    resolution: int
    in_channels: int
    model_channels: int
    cond_channels: int
    out_channels: int
    num_blocks: int
    num_heads: int | None = None
    num_head_channels: int | None = 64
    mlp_ratio: float = 4.0
    pe_mode: str = "ape"
    rope_freq: tuple[float, float] = DEFAULT_ROPE_FREQ
    dtype: str = "float32"
    use_checkpoint: bool = False
    share_mod: bool = False
    initialization: str = "vanilla"
    qk_rms_norm: bool = False
    qk_rms_norm_cross: bool = False

    def __post_init__(self):
        name = type(self).__name__
        for f in ("resolution", "in_channels", "model_channels", "cond_channels", "out_channels", "num_blocks"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}: {f} must be a positive integer; got {v!r}")
        if self.pe_mode != "rope":
            raise ConfigError(
                f"{name}: pe_mode {self.pe_mode!r} is not supported; TRELLIS.2 DiTs use pe_mode 'rope' "
                "(absolute position embeddings belong to TRELLIS v1 flow models). Set \"pe_mode\": \"rope\"."
            )
        if not self.share_mod:
            raise ConfigError(
                f"{name}: share_mod false (one adaLN_modulation per block) is not supported; TRELLIS.2 DiTs use "
                "the shared AdaLN layout. Set \"share_mod\": true."
            )
        if self.num_heads is None and not self.num_head_channels:
            raise ConfigError(f"{name}: give num_heads or num_head_channels; both are empty")
        if self.num_heads is None and self.model_channels % self.num_head_channels:
            raise ConfigError(
                f"{name}: model_channels {self.model_channels} is not divisible by num_head_channels "
                f"{self.num_head_channels}; choose a divisor or give num_heads"
            )
        heads = self.heads
        if not isinstance(heads, int) or heads <= 0 or self.model_channels % heads:
            raise ConfigError(
                f"{name}: model_channels {self.model_channels} must be divisible by num_heads {heads}; "
                "choose a num_heads that divides model_channels"
            )
        if (self.model_channels // heads) % 2:
            raise ConfigError(
                f"{name}: head dim model_channels/num_heads = {self.model_channels // heads} must be even for RoPE"
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and int(self.model_channels * self.mlp_ratio) > 0):
            raise ConfigError(f"{name}: mlp_ratio must be a positive number; got {self.mlp_ratio!r}")
        if len(self.rope_freq) != 2:
            raise ConfigError(f"{name}: rope_freq must be [scale, base] (two numbers); got {self.rope_freq!r}")
        if self.initialization not in ("vanilla", "scaled"):
            raise ConfigError(f"{name}: initialization must be 'vanilla' or 'scaled'; got {self.initialization!r}")
        parse_dtype(_DTYPE_ALIASES.get(self.dtype, self.dtype), what=f"{name}.dtype")

    @property
    def heads(self) -> int:
        """Number of attention heads (``num_heads`` or ``model_channels // num_head_channels``)."""
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(_DTYPE_ALIASES.get(self.dtype, self.dtype), what=f"{type(self).__name__}.dtype")


class FlowDiT(nn.Module):
    """Trunk shared by both flow DiTs: t_embedder, adaLN_modulation, input_layer, blocks, out_layer.

    Parameter precision (SPEC 3.7, manifests): Linear layers inside ``blocks`` in the block dtype (the
    ``dtype`` argument, else the config's), everything else float32.
    """

    Config = FlowDiTConfig
    accepts_zero_cond_from = True  # forward(..., zero_cond_from=k): items k.. have an all-zero cond (the sampler's)

    def __init__(self, config: FlowDiTConfig, *, device=None, dtype: torch.dtype | None = None, ops=None):
        super().__init__()
        ops = resolve(ops)
        self.config = config
        self.dtype = dtype if dtype is not None else config.torch_dtype  # block (compute) dtype
        c = config.model_channels
        self.t_embedder = TimestepEmbedder(c, ops=ops, device=device)
        self.adaLN_modulation = shared_adaln(c, ops=ops, device=device)
        self.input_layer = ops.Linear(config.in_channels, c, device=device, dtype=torch.float32)
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(
                c,
                config.cond_channels,
                config.heads,
                config.mlp_ratio,
                use_rope=True,
                qk_rms_norm=config.qk_rms_norm,
                qk_rms_norm_cross=config.qk_rms_norm_cross,
                ops=ops,
                device=device,
                dtype=self.dtype,
            )
            for _ in range(config.num_blocks)
        )
        self.out_layer = ops.Linear(c, config.out_channels, device=device, dtype=torch.float32)

    def _check_t_cond(self, t: torch.Tensor, cond: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Validate t / cond against the batch size; a 0-d t is broadcast. Returns t as [B] on ``device``."""
        if not torch.is_tensor(t) or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise InputError(f"t: expected a tensor [B={batch}] of 1000*t values; got {shape}")
        if t.dim() == 0:
            t = t.expand(batch)
        cc = self.config.cond_channels
        if not torch.is_tensor(cond) or cond.dim() != 3 or cond.shape[0] != batch or cond.shape[2] != cc:
            shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
            raise InputError(
                f"cond: expected condition tokens [B={batch}, L, {cc}] (one set per batch item); got {shape}"
            )
        return t.to(device)

    def _modulation(self, t: torch.Tensor) -> torch.Tensor:
        """Shared modulation [B, 6C], computed in float32 and cast to the block dtype."""
        return self.adaLN_modulation(self.t_embedder(t)).to(self.dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """float32 LayerNorm (no affine, eps 1e-5 — not the blocks' 1e-6) + out_layer."""
        h = h.float()
        return self.out_layer(F.layer_norm(h, h.shape[-1:], eps=1e-5))


def _drop_rope_phases(module, state_dict, prefix, *args) -> None:
    # Reference checkpoints may carry the reference's persistent buffer; it is recomputed here.
    state_dict.pop(prefix + "rope_phases", None)


@dataclasses.dataclass(frozen=True)
class SparseStructureFlowConfig(FlowDiTConfig):
    """Official args of SparseStructureFlowModel (see FlowDiTConfig). ``rope_freq`` is accepted but, as in
    the reference, not used: the dense model builds its phases with the default (1.0, 10000.0)."""


class SparseStructureFlowModel(FlowDiT):
    """Dense DiT over the R^3 sparse-structure latent (R = 16, 8 channels for the released model)."""

    Config = SparseStructureFlowConfig

    def __init__(self, config: SparseStructureFlowConfig, *, device=None, dtype: torch.dtype | None = None, ops=None):
        super().__init__(config, device=device, dtype=dtype, ops=ops)
        self._rope_cache: dict[torch.device, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(_drop_rope_phases)

    def rope_phases(self, device: torch.device | str | None = None) -> torch.Tensor:
        """complex64 [R^3, head_dim/2] phases of the grid tokens (cached per device)."""
        device = torch.device(device if device is not None else "cpu")
        phases = self._rope_cache.get(device)
        if phases is None:
            coords = grid_coords(self.config.resolution, device=device)
            phases = rope_phases(coords, self.config.head_dim, rope_freq=DEFAULT_ROPE_FREQ)
            self._rope_cache[device] = phases
        return phases

    def prepare_inputs(self, x: torch.Tensor) -> None:
        """Build what a first forward on x creates (the grid's RoPE phases), so that it can be CUDA-graph captured."""
        self.rope_phases(x.device)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, zero_cond_from: int | None = None
    ) -> torch.Tensor:
        """x [B, in, R, R, R], t [B] (1000*t), cond [B, L, Cc] -> [B, out, R, R, R] in x's dtype.

        zero_cond_from: the caller's promise that cond[zero_cond_from:] is all zeros (the negative condition):
        their cross-attention is one constant vector, not computed per token (``CrossAttention.forward``)."""
        cfg = self.config
        expected = (cfg.in_channels,) + (cfg.resolution,) * 3
        if not torch.is_tensor(x) or x.dim() != 5 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise InputError(f"x: expected a latent [B, {', '.join(map(str, expected))}]; got {shape}")
        b = x.shape[0]
        t = self._check_t_cond(t, cond, b, x.device)
        tokens = x.reshape(b, cfg.in_channels, -1).transpose(1, 2)  # [B, R^3, in]
        h = self.input_layer(tokens.float()).to(self.dtype)
        mod = self._modulation(t)
        cond = cond.to(self.dtype)
        phases = self.rope_phases(x.device)
        for block in self.blocks:
            h = block(h, mod, cond, phases, zero_from=zero_cond_from)
        out = self._head(h)  # [B, R^3, out]
        return out.transpose(1, 2).reshape(b, cfg.out_channels, *(cfg.resolution,) * 3).to(x.dtype)
