"""Decoding latents to O-Voxels (SPEC.md sections 9 and 14).

The shape decoder subdivides each latent voxel 16x (predicting which children exist) and emits the
flexible-dual-grid fields; the texture decoder follows exactly the same subdivisions (``guide_subs``), so its
PBR attributes land on the same voxels in the same row order.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..ovoxel.ovoxel import OVoxel
from ..sparse import SparseTensor
from .components import ComponentSource
from .types import MaterialLatent, ShapeLatent

SHAPE_DECODER, TEX_DECODER = "shape_slat_decoder", "tex_slat_decoder"


@torch.no_grad()
def decode_shape(components: ComponentSource, shape: ShapeLatent) -> OVoxel:
    """Geometry O-Voxel at the shape's resolution R, with the subdivision guides the texture decoder needs."""
    with components.use(SHAPE_DECODER) as decoder:
        raw, subs = decoder(shape.latent.to(components.device), return_subs=True)
        margin = decoder.voxel_margin  # the checkpoint config's (released: 0.5), not from_decoder_output's default
    return OVoxel.from_decoder_output(raw.coords, raw.feats.float(), shape.resolution, subdivision_guides=subs,
                                      voxel_margin=margin)


@torch.no_grad()
def decode_material(components: ComponentSource, material: MaterialLatent, geometry: OVoxel) -> OVoxel:
    """``geometry`` with PBR attributes [N, 6] (base colour, metallic, roughness, alpha; v * 0.5 + 0.5, unclamped)."""
    if geometry.subdivision_guides is None:
        raise InputError(
            "this O-Voxel has no subdivision guides (it was not decoded from a shape latent); decode the shape "
            "latent that the material latent was sampled on, or use the retexture path for a user mesh"
        )
    if material.resolution != geometry.resolution:
        raise InputError(
            f"material latent is for resolution {material.resolution} but the geometry is {geometry.resolution}; "
            "connect the material and the geometry of the same generation"
        )
    device = components.device
    guides = [g.to(device) for g in geometry.subdivision_guides]
    with components.use(TEX_DECODER) as decoder:
        tex = decoder(material.latent.to(device), guide_subs=guides)
    return attach_pbr(tex, geometry, "the geometry", "the material latent does not belong to this geometry "
                      "(connect both from the same shape latent)")


def attach_pbr(tex: SparseTensor, geometry: OVoxel, what: str, fix: str) -> OVoxel:
    """``geometry`` with the texture decoder's output [N, 6] as PBR attributes (``v * 0.5 + 0.5``, unclamped).

    tex must sit on exactly geometry's voxels in geometry's row order; otherwise InputError naming ``what`` (the
    geometry, e.g. "the mesh") and ``fix``.
    """
    coords = tex.coords[:, 1:].to(geometry.device)
    if coords.shape != geometry.coords.shape or not torch.equal(coords, geometry.coords):
        raise InputError(
            f"the texture decoder produced {coords.shape[0]} voxels but {what} has {geometry.num_voxels}; {fix}"
        )
    return geometry.with_attributes(tex.feats.float().to(geometry.device) * 0.5 + 0.5)


