"""Image preprocessing (SPEC 13): golden crop through every input convention, rounding, downscale, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trellis2.trellis2_core.errors import InputError
from trellis2.trellis2_core.image import from_comfy, preprocess_image, preprocess_with_alpha, to_comfy


@pytest.fixture
def case(golden):
    g = golden("image_cond_dinov3")
    return g.inputs["rgba_input_u8"].numpy(), g.outputs["preprocessed_rgb_u8"].numpy()


def _eq(img: Image.Image, expected: np.ndarray) -> bool:
    return img.mode == "RGB" and np.array_equal(np.asarray(img), expected)


def test_golden_rgba_pil_and_array(case):
    rgba, expected = case
    pil = Image.fromarray(rgba, "RGBA")
    before = pil.tobytes()
    assert _eq(preprocess_image(pil), expected)
    assert pil.tobytes() == before and pil.mode == "RGBA"  # the caller's image is untouched
    assert _eq(preprocess_image(rgba), expected)
    assert _eq(preprocess_image(rgba[None]), expected)  # batch of one


def test_golden_rgb_plus_explicit_alpha(case):
    rgba, expected = case
    assert _eq(preprocess_with_alpha(rgba[..., :3], rgba[..., 3]), expected)
    assert _eq(preprocess_image(Image.fromarray(rgba[..., :3]), mask=Image.fromarray(rgba[..., 3])), expected)
    assert _eq(preprocess_image(rgba[..., :3], mask=rgba[..., 3].astype(np.float32) / 255), expected)
    # an explicit mask replaces the image's own alpha
    assert _eq(preprocess_image(np.dstack([rgba[..., :3], np.zeros_like(rgba[..., 3])]), mask=rgba[..., 3]), expected)


def test_golden_comfy_conventions(case):
    rgba, expected = case
    t = torch.from_numpy(rgba.astype(np.float32) / 255)[None]  # what LoadImage produces
    assert _eq(from_comfy(t), expected)
    load_image_mask = 1.0 - t[..., 3]  # LoadImage MASK: 1 = transparent
    assert _eq(from_comfy(t[..., :3], load_image_mask, mask_is_foreground=False), expected)
    assert _eq(from_comfy(t[0, ..., :3], t[0, ..., 3], mask_is_foreground=True), expected)
    # LoadImage's 64x64 zero placeholder (image without alpha) is ignored: the RGBA alpha is used
    assert _eq(from_comfy(t, torch.zeros(1, 64, 64), mask_is_foreground=False), expected)
    assert to_comfy(preprocess_image(rgba)).shape == (1, *expected.shape)


def test_crop_rounds_half_to_even_and_premultiplies_by_truncation():
    a = np.zeros((8, 8), np.uint8)
    a[2:5, 1:5] = 255  # bbox x 1..4, y 2..4: centre (2.5, 3), size 3, half 1
    rgb = np.full((8, 8, 3), 200, np.uint8)
    rgb[:, :, 0] = np.arange(8, dtype=np.uint8)[None, :] * 10  # encodes the column
    out = np.asarray(preprocess_with_alpha(rgb, a))
    # box (1.5, 2, 3.5, 4) -> PIL rounds to (2, 2, 4, 4): columns 2 and 3
    assert out.shape == (2, 2, 3) and out[0, :, 0].tolist() == [20, 30]
    a2 = np.full((4, 4), 210, np.uint8)
    rgb2 = np.full((4, 4, 3), 30, np.uint8)
    out2 = np.asarray(preprocess_with_alpha(rgb2, a2))
    assert (out2 == 24).all()  # 30 * 210 / 255 = 24.7 -> truncated, not rounded


def test_crop_zero_fills_outside_the_image():
    a = np.zeros((10, 10), np.uint8)
    a[0:6, 0] = 255  # bbox x 0..0, y 0..5: size 5, half 2, centre (0, 2.5) -> box (-2, 0.5->0, 2, 4.5->4)
    rgb = np.full((10, 10, 3), 255, np.uint8)
    out = np.asarray(preprocess_with_alpha(rgb, a))
    assert out.shape == (4, 4, 3)
    assert (out[:, :2] == 0).all() and (out[:, 2] == 255).all() and (out[:, 3] == 0).all()


def test_large_image_is_downscaled_first_with_lanczos():
    w, h = 2100, 700
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[100:600, 300:1800] = (250, 120, 30, 255)
    out = preprocess_image(rgba)
    small = Image.fromarray(rgba, "RGBA").resize((1024, int(h * 1024 / w)), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(preprocess_image(small)))
    assert max(out.size) <= 1024


def test_background_remover_is_called_on_downscaled_rgb():
    seen = []

    def remover(img: Image.Image) -> Image.Image:
        seen.append((img.mode, img.size))
        m = Image.new("L", (64, 64), 0)
        m.paste(255, (16, 16, 48, 48))
        return m  # other size than the image: resized by the engine

    rgb = np.full((1200, 2048, 3), 90, np.uint8)
    out = preprocess_image(rgb, remove_background=remover)
    assert seen == [("RGB", (1024, 600))]
    assert out.mode == "RGB" and 480 <= out.size[0] <= 520 and np.asarray(out).max() == 90


def test_opaque_input_needs_mask_or_remover():
    rgba = np.full((16, 16, 4), 255, np.uint8)
    for img in (rgba, rgba[..., :3], Image.fromarray(rgba[..., :3])):
        with pytest.raises(InputError, match="remove_background"):
            preprocess_image(img)
    with pytest.raises(InputError, match="mask marks every pixel"):
        preprocess_image(rgba[..., :3], mask=np.ones((16, 16), np.float32))


@pytest.mark.parametrize("alpha", [np.zeros((16, 16), np.uint8), np.full((16, 16), 200, np.uint8)])
def test_empty_mask_or_transparent_image(alpha):
    rgb = np.full((16, 16, 3), 128, np.uint8)
    with pytest.raises(InputError, match=r"alpha > 0\.8.*inverted"):
        preprocess_with_alpha(rgb, alpha)
    with pytest.raises(InputError, match=r"alpha > 0\.8"):
        preprocess_image(np.dstack([rgb, alpha]))


def test_bad_shapes_sizes_and_batches():
    with pytest.raises(InputError, match="non-empty"):
        preprocess_image(Image.new("RGBA", (0, 5)))
    with pytest.raises(InputError, match="non-empty"):
        preprocess_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match="C in 1"):
        preprocess_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(InputError, match="batch of 2.*ImageFromBatch"):
        preprocess_image(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="dtype"):
        preprocess_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(InputError, match="mask: expected the image's size"):
        preprocess_image(np.zeros((8, 8, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="PIL image or a numpy array"):
        preprocess_image("photo.png")


def test_comfy_errors():
    img = torch.rand(1, 8, 8, 3)
    with pytest.raises(InputError, match="mask_is_foreground"):
        from_comfy(img, torch.zeros(1, 8, 8))
    with pytest.raises(InputError, match="batch of 2"):
        from_comfy(torch.rand(2, 8, 8, 3))
    with pytest.raises(InputError, match="batch of 3"):
        from_comfy(img, torch.zeros(3, 8, 8), mask_is_foreground=True)
    with pytest.raises(InputError, match=r"C in \(3, 4\)"):
        from_comfy(torch.rand(1, 8, 8, 2))
    with pytest.raises(InputError, match="non-empty"):
        from_comfy(torch.rand(1, 0, 8, 3))
    with pytest.raises(InputError, match="torch tensor"):
        from_comfy(np.zeros((1, 8, 8, 3), np.float32))
