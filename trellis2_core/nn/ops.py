"""The ``ops`` namespace models build their layers from.

Models call ``ops.Linear``, ``ops.Conv3d`` and ``ops.LayerNorm`` instead of ``torch.nn`` directly, so the
nodes layer can inject ComfyUI's casting ops (weights stored in one dtype, computed in another) without the
engine importing ComfyUI. Any object with these three attributes works.
"""

from types import SimpleNamespace

import torch.nn as nn

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, Conv3d=nn.Conv3d, LayerNorm=nn.LayerNorm)


def resolve(ops):
    """``ops`` or the plain torch namespace."""
    return TORCH_OPS if ops is None else ops
