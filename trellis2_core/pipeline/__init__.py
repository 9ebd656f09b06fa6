"""The generation pipeline: stages as plain functions, and ``Trellis2Pipeline`` that strings them together."""

from .components import Components, ComponentSource
from .memory import MemoryPlan, plan_memory
from .multiview import MULTIVIEW_MODES
from .retexture import Retexture, decode_on_mesh, encode_mesh, retexture_mesh, sample_mesh_material
from .trellis2 import Generation, Trellis2Pipeline, default_device, default_dtype
from .types import PIPELINE_TYPES, Conditioning, MaterialLatent, ShapeLatent, Structure, plan

__all__ = [
    "MULTIVIEW_MODES",
    "PIPELINE_TYPES",
    "ComponentSource",
    "Components",
    "Conditioning",
    "Generation",
    "MaterialLatent",
    "MemoryPlan",
    "Retexture",
    "ShapeLatent",
    "Structure",
    "Trellis2Pipeline",
    "decode_on_mesh",
    "default_device",
    "default_dtype",
    "encode_mesh",
    "plan",
    "plan_memory",
    "retexture_mesh",
    "sample_mesh_material",
]
