"""Multi-view conditioning node: an IMAGE batch of views of one object -> one TRELLIS2_CONDITIONING.

A separate node rather than a batch mode of Trellis2Conditioning, so that node (and every saved workflow using
it) stays exactly as it was, and the multi-view trade-offs sit on the node that has them. Its output is the same
socket type as the single-image node's, so every downstream node (structure, geometry, material, retexture)
takes it unchanged; with a batch of one it gives exactly the single-image node's conditioning.

Views come as one IMAGE batch [V, H, W, C] (core's "Batch Images" joins LoadImage outputs; it resizes to the
first image's size, which is harmless: each view is cropped to its object and resized by the preprocessing).
Transparency: RGBA images (core's "Join Image with Alpha" turns LoadImage's IMAGE + MASK into one), or a MASK
batch with one mask per view. How the views are combined: trellis2_core/pipeline/multiview.py.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from comfy_api.latest import io

from ..trellis2_core.errors import InputError
from ..trellis2_core.image import from_comfy
from ..trellis2_core.pipeline.multiview import MULTIVIEW_MODES, check_mode
from .generation import MASK_CONVENTIONS, RESOLUTIONS, _model_input
from .sockets import CATEGORY, ConditioningSocket

MAX_VIEWS = 16  # beyond this "concat" context grows past anything the flows were trained near; refuse clearly
MODE_TIP = (
    "How the views condition each sampler step (no new weights; TRELLIS.2 is trained on single images). "
    "concat (default): one context of all views' tokens every step; each voxel attends to the views that match it; "
    "same number of model calls as one view, cross-attention cost and memory grow with the view count. "
    "average: one model call per view each step, velocities averaged (TRELLIS v1 'multidiffusion'); about V times "
    "slower, memory of one view, disagreeing views are blended (smoother). "
    "alternate: step k uses view k mod V (TRELLIS v1 'stochastic'); cost of one view; put the most informative view "
    "first and use at least as many steps as views. Views carry no camera poses: they must show the same object."
)


def _views(images: torch.Tensor, masks: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(image [1, H, W, C], mask [1, H, W] or None) per view; clear errors for malformed batches."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images: expected an IMAGE batch [V, H, W, C] (one image per view); got {got}")
    count = int(images.shape[0])
    if not 1 <= count <= MAX_VIEWS:
        raise InputError(f"images: expected 1 to {MAX_VIEWS} views; got a batch of {count}. Pass fewer views (1-8 work best)")
    if masks is None:
        return [(images[i : i + 1], None) for i in range(count)]
    if not isinstance(masks, torch.Tensor) or masks.dim() not in (2, 3):
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InputError(f"masks: expected a MASK batch [V, H, W]; got {got}")
    masks = masks[None] if masks.dim() == 2 else masks
    if masks.shape[0] != count:
        raise InputError(
            f"masks: expected one mask per view ({count}); got a batch of {masks.shape[0]}. Connect a MASK batch of the "
            "same length, or give RGBA views ('Join Image with Alpha') and leave masks unconnected"
        )
    return [(images[i : i + 1], masks[i : i + 1]) for i in range(count)]


def preview_batch(crops: list[Image.Image]) -> torch.Tensor:
    """The crops as one IMAGE [V, S, S, 3] (S = the largest crop side; crops are square), for PreviewImage."""
    side = max(c.size[0] for c in crops)
    arrays = [np.asarray(c.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), np.float32) / 255 for c in crops]
    return torch.from_numpy(np.stack(arrays))


class Trellis2MultiViewConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Trellis2MultiViewConditioning", display_name="TRELLIS.2 Multi-View Conditioning", category=CATEGORY,
            description="Several images of ONE object (front, side, back, ...) condition one generation: each view is "
                        "cropped and encoded with DINOv3, and the sampler combines them as multiview_mode says. "
                        "One image gives exactly Trellis2Conditioning's result.",
            inputs=[
                _model_input(),
                io.Image.Input("images", tooltip="IMAGE batch, one image per view (1 to 8 work best; join LoadImage "
                                                 "outputs with 'Batch Images'). RGBA, or RGB with the masks input."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional MASK batch, one foreground mask per view (replaces the images' alpha)."),
                io.Combo.Input("mask_convention", options=list(MASK_CONVENTIONS), default=next(iter(MASK_CONVENTIONS)),
                               tooltip="What 1 means in the masks: LoadImage's MASK is 1 where the picture is transparent "
                                       "(background); segmentation nodes give 1 on the object."),
                io.Combo.Input("resolutions", options=list(RESOLUTIONS), default="512 + 1024",
                               tooltip="DINOv3 token grids to compute: the structure stage needs 512; every pipeline type "
                                       "except '512' also needs 1024. Retexturing at 512 needs 512, at 1024 needs 1024."),
                io.Combo.Input("multiview_mode", options=list(MULTIVIEW_MODES), default="concat", tooltip=MODE_TIP),
            ],
            outputs=[
                ConditioningSocket.Output(display_name="conditioning"),
                io.Image.Output(display_name="preprocessed", tooltip="The square crop of every view, as the model sees them."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, images, mask_convention, resolutions, multiview_mode, masks=None) -> io.NodeOutput:
        if mask_convention not in MASK_CONVENTIONS:
            raise InputError(f"mask_convention must be one of {list(MASK_CONVENTIONS)}; got {mask_convention!r}")
        if resolutions not in RESOLUTIONS:
            raise InputError(f"resolutions must be one of {list(RESOLUTIONS)}; got {resolutions!r}")
        check_mode(multiview_mode)
        crops = []
        for index, (image, mask) in enumerate(_views(images, masks)):
            convention = MASK_CONVENTIONS[mask_convention] if mask is not None else None
            try:
                crops.append(from_comfy(image, mask, mask_is_foreground=convention))
            except InputError as e:  # say which view it was
                raise InputError(f"view {index + 1} of {len(images)}: {e}") from e
        cond = model.condition(crops, RESOLUTIONS[resolutions], preprocess=False, multiview_mode=multiview_mode)
        return io.NodeOutput(cond, preview_batch(crops))


NODES = [Trellis2MultiViewConditioning]
