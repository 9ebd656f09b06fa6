"""Image preparation for TRELLIS.2 conditioning (SPEC.md section 13, ``preprocess_image``).

The model wants the object alone on black, cropped to a square around it. Inputs come as an image with an
alpha channel, an image plus a separate foreground mask, or an opaque image plus a background remover:

    preprocess_image(image, mask=None, remove_background=None) -> PIL RGB crop, black background

1. The alpha is the explicit ``mask`` if given, else the image's own alpha channel. An alpha that is 255
   everywhere carries no information (the reference treats a fully opaque RGBA like RGB): the background
   remover is called then, and without one an InputError says what to pass.
2. If ``max(w, h) > 1024`` the RGBA image is downscaled by ``1024 / max(w, h)`` with LANCZOS (PIL resamples
   RGBA premultiplied) before anything else; the remover runs on the downscaled RGB.
3. Crop to the square around the bbox of ``alpha > 0.8*255`` exactly as the reference (float box, PIL's
   half-to-even rounding, zero fill outside), then ``rgb * alpha`` premultiplied in float32 and truncated to uint8.

ComfyUI tensors go through ``from_comfy`` (conventions in its docstring). Background removal models are not
part of this module: ``remove_background`` is any callable ``PIL RGB -> PIL 'L'`` (255 = object).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from .errors import InputError

logger = logging.getLogger(__name__)

MAX_SIZE = 1024  # longest side the reference works at; larger inputs are downscaled first
ALPHA_THRESHOLD = 0.8 * 255  # bbox of the object: alpha > 204
_ROWS_PER_CHUNK = 256  # float -> uint8 conversion in row blocks so a huge image never has a full float copy

BackgroundRemover = Callable[[Image.Image], Image.Image]
ImageLike = Union[Image.Image, np.ndarray]


def preprocess_image(
    image: ImageLike,
    mask: Optional[ImageLike] = None,
    *,
    remove_background: Optional[BackgroundRemover] = None,
) -> Image.Image:
    """Crop the object to a square on a black background, as the reference pipeline does.

    image: PIL image (RGBA / LA / PA / P with transparency keep their alpha; other modes are read as RGB) or a
           numpy array ``[H, W]`` / ``[H, W, C]`` (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; a leading batch axis of
           size 1 is accepted), uint8 0..255, float 0..1, or bool.
    mask:  optional foreground alpha replacing the image's own: PIL image (read as 'L') or numpy ``[H, W]``
           (uint8 0..255, float 0..1 or bool), **255 / 1.0 / True = object**, same size as ``image``.
           (ComfyUI's LoadImage MASK is the opposite, 1 = transparent: use ``from_comfy``.)
    remove_background: callable ``PIL RGB -> PIL 'L'`` (255 = object), used only when there is no informative
           alpha; a mask of another size is resized to the image with bicubic filtering.
    Returns a PIL RGB image, square, side ``2 * (size // 2)`` of the object's bbox (at most 1024).
    Raises InputError for empty, malformed or object-free inputs, naming the fix.
    """
    rgba = _as_rgba_or_rgb(image, "image")
    if mask is not None:
        alpha = _as_alpha(mask, "mask")
        if alpha.size != rgba.size:
            if _opaque(alpha):  # e.g. ComfyUI LoadImage's 64x64 placeholder for images without alpha
                logger.debug("ignoring an all-opaque %sx%s mask of another size than the image", *alpha.size)
                alpha = None
            else:
                raise InputError(
                    f"mask: expected the image's size {rgba.size[0]}x{rgba.size[1]} (w x h); got "
                    f"{alpha.size[0]}x{alpha.size[1]}. Resize the mask to the image or pass the mask of this image."
                )
        if alpha is not None:
            rgba = rgba.convert("RGB")
            rgba.putalpha(alpha)
    has_alpha = rgba.mode == "RGBA" and not _opaque(rgba.getchannel("A"))

    scale = MAX_SIZE / max(rgba.size)
    if scale < 1:
        size = (max(1, int(rgba.width * scale)), max(1, int(rgba.height * scale)))
        rgba = rgba.resize(size, Image.Resampling.LANCZOS)

    if not has_alpha:
        rgba = _remove_background(rgba.convert("RGB"), remove_background, had_mask=mask is not None)
    return crop_and_premultiply(rgba)


def preprocess_with_alpha(rgb: ImageLike, alpha: ImageLike, *, remove_background=None) -> Image.Image:
    """``preprocess_image`` for an RGB image plus an explicit foreground alpha (255 / 1.0 = object), same size.

    rgb:   PIL image or numpy ``[H, W, 3]`` (uint8 or float 0..1); any alpha it carries is ignored.
    alpha: PIL image or numpy ``[H, W]`` (uint8, float 0..1 or bool).
    """
    if alpha is None:
        raise InputError("alpha: expected a foreground mask [H, W] (255 or 1.0 = object); got None. "
                         "Use preprocess_image(image, remove_background=...) when there is no mask.")
    return preprocess_image(rgb, mask=alpha, remove_background=remove_background)


def crop_and_premultiply(rgba: Image.Image) -> Image.Image:
    """Steps 4-5 of SPEC 13 on an RGBA image (any size): square crop around ``alpha > 0.8*255``, premultiply.

    Returns PIL RGB uint8; side ``2 * (size // 2)`` where ``size = max(x1 - x0, y1 - y0)`` of the inclusive bbox.
    """
    alpha = np.asarray(rgba.getchannel("A"))
    rows = np.flatnonzero((alpha > ALPHA_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((alpha > ALPHA_THRESHOLD).any(axis=0))
    if rows.size == 0:
        raise InputError(
            f"image/mask: no pixel has alpha > 0.8 (object); got alpha max {int(alpha.max())}/255. The mask is empty "
            "or the image fully transparent. Pass a mask where the object is 255 / 1.0 (check it is not inverted: "
            "ComfyUI's LoadImage MASK is 1 - alpha) or an image with an alpha channel."
        )
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) // 2
    # Float box on purpose: PIL rounds each side half-to-even and zero-fills outside, as in the reference.
    crop = rgba.crop((cx - half, cy - half, cx + half, cy + half))
    # float32 arithmetic and truncation exactly as the reference (crop is at most 1024^2).
    arr = np.asarray(crop, dtype=np.float32) / 255
    rgb = arr[:, :, :3] * arr[:, :, 3:4]
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def from_comfy(
    image: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    mask_is_foreground: Optional[bool] = None,
    remove_background: Optional[BackgroundRemover] = None,
) -> Image.Image:
    """``preprocess_image`` for ComfyUI's ``IMAGE`` / ``MASK`` tensors.

    image: IMAGE, float tensor ``[1, H, W, C]`` (or ``[H, W, C]``) in 0..1, C = 3 (RGB) or 4 (RGBA; the 4th
           channel is alpha, 1 = opaque). Batches of more than one image are refused.
    mask:  optional MASK, float ``[1, H, W]`` or ``[H, W]`` in 0..1; replaces the image's alpha.
    mask_is_foreground: required with a mask, because ComfyUI has both conventions:
           False: 1 = transparent / background: the MASK output of core's LoadImage (it is 1 - alpha);
           True:  1 = object: masks from segmentation / background-removal nodes.
           A mask of another size that is all background-free (LoadImage's 64x64 placeholder of an image
           without alpha) is ignored.
    Floats become uint8 by rounding (``round(v * 255)``), so a LoadImage'd 8-bit image comes back bit-exact.
    """
    rgb = _comfy_to_uint8(image, "image", channels=(3, 4))
    fg = None
    if mask is not None:
        if mask_is_foreground is None:
            raise InputError(
                "mask_is_foreground: required when a mask is given; got None. Pass False for the MASK of "
                "ComfyUI's LoadImage (1 = transparent) or True for masks where 1 = object (segmentation nodes)."
            )
        fg = _comfy_to_uint8(mask, "mask", channels=None)
        if not mask_is_foreground:
            fg = 255 - fg
    return preprocess_image(rgb, mask=fg, remove_background=remove_background)


def to_comfy(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE, float32 tensor ``[1, H, W, 3]`` in 0..1 (for previewing the crop)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr)[None]


# ----------------------------------------------------------------------------------------------------------------
# validation / conversion helpers


def _remove_background(rgb: Image.Image, remover: Optional[BackgroundRemover], *, had_mask: bool) -> Image.Image:
    if remover is None:
        what = "the mask marks every pixel as object" if had_mask else "the image has no alpha channel (or it is opaque)"
        raise InputError(
            f"remove_background: {what} and no background remover was given. Pass an RGBA image with "
            "transparency, a foreground mask (255 / 1.0 = object), or remove_background=<callable PIL RGB -> PIL 'L'>."
        )
    out = remover(rgb)
    if isinstance(out, np.ndarray):
        mask = _as_alpha(out, "remove_background result")
    elif isinstance(out, Image.Image):
        mask = out.convert("L")
    else:
        raise InputError(f"remove_background: must return a PIL image (mode 'L', 255 = object); got {type(out).__name__}")
    if mask.size != rgb.size:
        mask = mask.resize(rgb.size, Image.Resampling.BICUBIC)
    rgba = rgb.copy()
    rgba.putalpha(mask)
    return rgba


def _opaque(alpha: Image.Image) -> bool:
    return alpha.getextrema()[0] == 255


def _check_size(w: int, h: int, what: str) -> None:
    if w <= 0 or h <= 0:
        raise InputError(f"{what}: expected a non-empty image; got size {w}x{h} (w x h). Pass a real image.")


def _as_rgba_or_rgb(image: ImageLike, what: str) -> Image.Image:
    """PIL 'RGBA' (when it carries alpha) or 'RGB'. Never modifies the caller's image."""
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, what)
        if image.mode == "RGBA":
            return image
        if image.mode in ("LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            return image.convert("RGBA")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = _squeeze_batch(image, what, batched_ndim=4)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
            raise InputError(
                f"{what}: expected an array [H, W] or [H, W, C] with C in 1 (gray), 2 (gray+alpha), 3 (RGB), "
                f"4 (RGBA); got shape {tuple(image.shape)}. Channels-first arrays must be transposed to HWC."
            )
        _check_size(arr.shape[1], arr.shape[0], what)
        u8 = _to_uint8(arr, what)
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[u8.shape[2]]
        pil = Image.fromarray(u8 if u8.shape[2] > 1 else u8[:, :, 0], mode)
        return pil if mode in ("RGB", "RGBA") else pil.convert("RGBA" if mode == "LA" else "RGB")
    raise InputError(f"{what}: expected a PIL image or a numpy array; got {type(image).__name__}")


def _as_alpha(mask: ImageLike, what: str) -> Image.Image:
    """PIL 'L' foreground alpha from a PIL image or an array [H, W] (uint8 / float 0..1 / bool)."""
    if isinstance(mask, Image.Image):
        _check_size(mask.width, mask.height, what)
        return mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L")
    if isinstance(mask, np.ndarray):
        arr = _squeeze_batch(mask, what, batched_ndim=3)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise InputError(f"{what}: expected a single-channel mask [H, W]; got shape {tuple(mask.shape)}")
        _check_size(arr.shape[1], arr.shape[0], what)
        return Image.fromarray(_to_uint8(arr, what), "L")
    raise InputError(f"{what}: expected a PIL image or a numpy array [H, W]; got {type(mask).__name__}")


def _squeeze_batch(arr: np.ndarray, what: str, *, batched_ndim: int) -> np.ndarray:
    """Drop a leading batch axis of size 1 (arrays of ``batched_ndim`` dims); refuse larger batches."""
    if arr.ndim == batched_ndim and not (batched_ndim == 3 and arr.shape[2] == 1):
        if arr.shape[0] != 1:
            raise InputError(
                f"{what}: expected one image; got a batch of {arr.shape[0]} (shape {tuple(arr.shape)}). "
                "Pick one image of the batch (e.g. ComfyUI's 'ImageFromBatch') or run once per image."
            )
        return arr[0]
    return arr


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; bool -> 0/255; float 0..1 -> round(v*255), clipped, converted in row blocks."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{what}: expected uint8 (0..255), float (0..1) or bool values; got dtype {arr.dtype}")
    out = np.empty(arr.shape, np.uint8)
    for r in range(0, arr.shape[0], _ROWS_PER_CHUNK):
        block = np.nan_to_num(arr[r : r + _ROWS_PER_CHUNK].astype(np.float32), nan=0.0)
        out[r : r + _ROWS_PER_CHUNK] = np.clip(np.rint(block * 255), 0, 255)
    return out


def _comfy_to_uint8(t: torch.Tensor, what: str, channels: Optional[tuple[int, ...]]) -> np.ndarray:
    """ComfyUI float tensor -> uint8 numpy (one image), converted in row blocks on the tensor's device."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what}: expected a torch tensor (ComfyUI {what.upper()}); got {type(t).__name__}")
    want = "[1, H, W, C] or [H, W, C]" if channels else "[1, H, W] or [H, W]"
    dims = 3 if channels else 2
    if t.dim() == dims + 1:
        if t.shape[0] != 1:
            raise InputError(
                f"{what}: expected one image; got a batch of {t.shape[0]} (shape {tuple(t.shape)}). "
                "Pick one image of the batch (e.g. ComfyUI's 'ImageFromBatch') or run once per image."
            )
        t = t[0]
    if t.dim() != dims:
        raise InputError(f"{what}: expected a tensor {want}; got shape {tuple(t.shape)}")
    if channels and t.shape[-1] not in channels:
        raise InputError(f"{what}: expected C in {channels} (RGB / RGBA) in {want}; got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{what}: expected a non-empty image; got shape {tuple(t.shape)}. Pass a real image.")
    if not t.is_floating_point():
        raise InputError(f"{what}: expected a float tensor in 0..1; got dtype {t.dtype}")
    t = t.detach()
    out = np.empty(tuple(t.shape), np.uint8)
    for r in range(0, t.shape[0], _ROWS_PER_CHUNK):
        block = t[r : r + _ROWS_PER_CHUNK].float().nan_to_num(0.0).mul(255).round().clamp(0, 255)
        out[r : r + _ROWS_PER_CHUNK] = block.to("cpu").numpy().astype(np.uint8)
    return out


__all__ = ["BackgroundRemover", "crop_and_premultiply", "from_comfy", "preprocess_image", "preprocess_with_alpha",
           "to_comfy"]
