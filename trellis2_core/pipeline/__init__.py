"""The generation pipeline: stages as plain functions, and ``Trellis2Pipeline`` that strings them together."""

from .components import Components, ComponentSource
from .trellis2 import Generation, Trellis2Pipeline, default_device, default_dtype
from .types import PIPELINE_TYPES, Conditioning, MaterialLatent, ShapeLatent, Structure, plan

__all__ = [
    "PIPELINE_TYPES",
    "ComponentSource",
    "Components",
    "Conditioning",
    "Generation",
    "MaterialLatent",
    "ShapeLatent",
    "Structure",
    "Trellis2Pipeline",
    "default_device",
    "default_dtype",
    "plan",
]
