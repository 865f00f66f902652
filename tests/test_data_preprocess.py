"""Preprocessing: Inception crop, resize, flip, translation, eval crop, labels, mixup, RandAugment."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from vit_jax.data import preprocess
from vit_jax.data.randaugment import OPS, randaugment


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def _photo(height: int = 300, width: int = 400) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def test_inception_crop_boxes_lie_inside_with_the_configured_area_and_aspect_ratio():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        left, top, right, bottom = preprocess.inception_crop_box(400, 300, rng, min_area=0.05)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        width, height = right - left, bottom - top
        areas.append(width * height / (400 * 300))
        if (width, height) != (400, 300):  # the whole image is the fallback after 100 misses
            assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
    assert 0.04 <= min(areas) < 0.15 and max(areas) > 0.9


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (100, 20)])
def test_inception_crop_boxes_are_distributed_as_tensorflows_sample_distorted_bounding_box(width, height):
    """The paper's code crops with TF's op: area and aspect-ratio quantiles of 2000 boxes against 2000 of TF's."""
    tf = pytest.importorskip("tensorflow")

    def quantiles(boxes):
        boxes = np.asarray(boxes, np.float64)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return np.quantile(w * h / (width * height), [0.1, 0.5, 0.9]), np.quantile(w / h, [0.1, 0.5, 0.9])

    theirs = []
    for i in range(2000):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], tf.zeros([0, 0, 4], tf.float32), seed=[i, 7], area_range=(0.05, 1.0),
            min_object_covered=0, use_image_if_no_bounding_boxes=True)
        top, left, h, w = int(begin[0]), int(begin[1]), int(size[0]), int(size[1])
        theirs.append((left, top, left + w, top + h))
    rng = np.random.default_rng(0)
    ours = [preprocess.inception_crop_box(width, height, rng) for _ in range(2000)]
    for left, top, right, bottom in ours:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
    (our_area, our_ratio), (tf_area, tf_ratio) = quantiles(ours), quantiles(theirs)
    np.testing.assert_allclose(our_area, tf_area, atol=0.025)
    np.testing.assert_allclose(our_ratio, tf_ratio, atol=0.03)


def test_train_preprocess_gives_the_configured_size_dtype_and_labels():
    transform = preprocess.TrainPreprocess(image_size=64, num_classes=5, inception_crop=True, flip=True)
    rng = np.random.default_rng(1)
    for fmt in ("JPEG", "PNG"):
        out = transform({"image": _encoded(_photo(), fmt), "label": 3, "index": 7}, rng)
        assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
        np.testing.assert_array_equal(out["label"], [0, 0, 0, 1, 0])
        assert out["index"] == 7
    scaled = preprocess.to_unit_range(out["image"])
    assert scaled.dtype == np.float32 and -1.0 <= scaled.min() and scaled.max() <= 1.0
    np.testing.assert_allclose(preprocess.to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def test_crop_and_resize_matches_pillow_crop_then_resize_and_jpeg_draft_stays_close():
    y, x = np.mgrid[:480, :640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x // 4 + y // 4) % 128], axis=-1).astype(np.uint8)
    box = (100, 50, 420, 370)
    ours = preprocess.crop_and_resize(preprocess.open_image(_encoded(pixels, "PNG")), box, 32, antialias=True)
    reference = np.asarray(Image.fromarray(pixels).crop(box).resize((32, 32), Image.Resampling.BILINEAR))
    assert ours.shape == (32, 32, 3)
    # Close: differences come from the filter's reach past the box edge and the integer pre-reduction.
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert difference.mean() < 1.0 and difference[2:-2, 2:-2].max() <= 4
    # JPEG is decoded at a reduced DCT scale when the output is much smaller; the result stays close.
    drafted = preprocess.crop_and_resize(preprocess.open_image(_encoded(pixels, "JPEG")), box, 32, antialias=True)
    assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 4


@pytest.mark.parametrize("shape, box, size", [
    ((427, 640), (0, 0, 640, 427), 224),  # shrink: no antialiasing
    ((32, 32), (0, 0, 32, 32), 100),  # enlarge, as CIFAR to 100px
    ((300, 400), (37.4, 20.6, 337.4, 280.6), 96),  # a fractional (central-crop) box: whole pixels, as TF slices
])
def test_resize_without_antialiasing_matches_tf_image_resize(shape, box, size):
    tf = pytest.importorskip("tensorflow")
    pixels = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = preprocess.crop_and_resize(preprocess.open_image(_encoded(pixels, "PNG")), box, size, antialias=False)
    left, top, right, bottom = (round(v) for v in box)
    crop = tf.image.crop_to_bounding_box(pixels, top, left, bottom - top, right - left)
    expected = tf.image.resize(crop, (size, size), method="bilinear", antialias=False).numpy()
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours - expected).max() <= 0.51  # TF returns floats; ours are rounded to uint8 (float32 order)
    # Pillow's antialiased filter is another resize when it shrinks.
    antialiased = preprocess.crop_and_resize(preprocess.open_image(_encoded(pixels, "PNG")), box, size,
                                             antialias=True)
    assert (np.abs(antialiased - expected).mean() > 5) == (right - left > size)


def test_flip_mirrors_half_the_time_and_translate_shifts_with_black_fill():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    rng = np.random.default_rng(0)
    flips = [not np.array_equal(preprocess.flip_left_right(image, rng), image) for _ in range(400)]
    assert 150 < sum(flips) < 250
    mirrored = next(out for out in (preprocess.flip_left_right(image, rng) for _ in range(10))
                    if not np.array_equal(out, image))
    np.testing.assert_array_equal(mirrored, image[:, ::-1])
    ones = np.full((6, 6, 1), 255, np.uint8)
    shifts = set()
    for _ in range(100):
        out = preprocess.random_translate(ones, 1, rng)
        assert out.shape == ones.shape
        rows, cols = np.nonzero(out[..., 0] == 0)
        shifts.add((len(set(rows)), len(set(cols))))
        assert np.count_nonzero(out == 255) in (36, 30, 25)  # no shift, one axis, both axes
    assert len(shifts) > 1


def test_eval_preprocess_is_deterministic_and_crops_the_centre():
    pixels = np.zeros((200, 200, 3), np.uint8)
    pixels[50:150, 50:150] = 255  # a white centre in a black frame
    example = {"image": _encoded(pixels, "PNG"), "label": 1, "index": 0}
    full = preprocess.EvalPreprocess(image_size=40, num_classes=2, crop_fraction=1.0)
    first, second = full(example), full(example)
    np.testing.assert_array_equal(first["image"], second["image"])
    assert first["image"].shape == (40, 40, 3) and first["mask"] == 1.0
    assert first["image"].min() == 0  # the frame is visible
    centre = preprocess.EvalPreprocess(image_size=40, num_classes=2, crop_fraction=0.5)(example)["image"]
    # As resizing to 40 / 0.5 = 80 and cutting the central 40: only the white centre remains.
    reference = np.asarray(Image.fromarray(pixels).resize((80, 80), Image.Resampling.BILINEAR))[20:60, 20:60]
    assert np.abs(centre.astype(int) - reference.astype(int)).max() <= 64
    assert centre[1:-1, 1:-1].min() == 255 and centre.mean() > 240
    with pytest.raises(ValueError, match="fraction 1.5 is invalid"):
        preprocess.central_box(10, 10, 1.5)


def test_labels_one_hot_and_multi_hot_and_out_of_range():
    np.testing.assert_array_equal(preprocess.encode_label(2, 4), [0, 0, 1, 0])
    np.testing.assert_array_equal(preprocess.encode_label(np.array([0, 3]), 4), [1, 0, 0, 1])
    np.testing.assert_array_equal(preprocess.encode_label(np.array([], np.int64), 3), [0, 0, 0])
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 4\)"):
        preprocess.encode_label(7, 4)


def test_mixup_is_a_convex_combination_of_the_batch_and_its_roll():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 2, 2, 3)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)
    mixed_images, mixed_labels = preprocess.mixup(images, labels, alpha=0.4, rng=np.random.default_rng(3))
    lam = mixed_labels[0, 0]
    assert 0.0 <= lam <= 1.0 and math.isclose(mixed_labels[0, 3], 1 - lam, rel_tol=1e-5)
    np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * np.roll(images, 1, axis=0), rtol=1e-5)
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("antialias", [False, True])
def test_corrupt_bytes_raise_corrupt_image_error(antialias):
    with pytest.raises(preprocess.CorruptImageError):
        preprocess.open_image(b"not an image at all")
    truncated = _encoded(_photo(), "JPEG")[:400]
    with pytest.raises(preprocess.CorruptImageError):
        preprocess.crop_and_resize(preprocess.open_image(truncated), (0, 0, 400, 300), 16, antialias)


@pytest.mark.parametrize("antialias", [False, True])
def test_a_central_box_smaller_than_a_pixel_still_gives_an_image(antialias):
    """A 2x2 image's central 30% is (0.7, 0.7, 1.3, 1.3): whole pixels, it is one pixel, never an empty crop."""
    pixels = np.array([[[0, 0, 0], [10, 10, 10]], [[20, 20, 20], [30, 30, 30]]], np.uint8)
    image = preprocess.open_image(_encoded(pixels, "PNG"))
    out = preprocess.crop_and_resize(image, preprocess.central_box(2, 2, 0.3), 4, antialias)
    assert out.shape == (4, 4, 3)
    if not antialias:
        assert (out == 30).all()  # pixel (1, 1)


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_randaugment_op_keeps_shape_and_dtype(op):
    image = Image.fromarray(_photo(32, 48))
    out = np.asarray(OPS[op](image, 10.0, np.random.default_rng(0)))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_randaugment_changes_the_image_and_is_reproducible_from_the_seed():
    image = Image.fromarray(_photo(32, 32))
    first = np.asarray(randaugment(image, 2, 10, np.random.default_rng(5)))
    second = np.asarray(randaugment(image, 2, 10, np.random.default_rng(5)))
    np.testing.assert_array_equal(first, second)
    assert any(not np.array_equal(np.asarray(randaugment(image, 2, 10, np.random.default_rng(s))), _photo(32, 32))
               for s in range(5))


@pytest.mark.parametrize("magnitude, threshold", [(5, 128), (10, 0), (15, 128), (20, 0)])
def test_randaugment_solarize_threshold_wraps_at_256_as_the_tf_reference(magnitude, threshold):
    """The reference casts int(M / 10 * 256) to uint8: M=10 and 20 invert every pixel (big_vision#110)."""
    pixels = _photo(16, 16)
    out = np.asarray(OPS["Solarize"](Image.fromarray(pixels), float(magnitude), np.random.default_rng(0)))
    np.testing.assert_array_equal(out, np.where(pixels < threshold, pixels, 255 - pixels))


@pytest.mark.parametrize("size, magnitude", [((224, 224), 10), ((32, 48), 3), ((300, 200), 15)])
def test_randaugment_contrast_matches_the_tf_reference(size, magnitude):
    """The reference's `contrast` op, in TF: it blends towards histogram total / 256, not the mean grey level."""
    tf = pytest.importorskip("tensorflow")
    pixels = _photo(*size)
    factor = magnitude / 10 * 1.8 + 0.1
    grey = tf.cast(tf.image.rgb_to_grayscale(pixels), tf.int32)
    hist = tf.histogram_fixed_width(grey, [0, 255], nbins=256)
    mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
    degenerate = tf.image.grayscale_to_rgb(tf.cast(tf.clip_by_value(tf.ones_like(grey, tf.float32) * mean, 0.0, 255.0),
                                                   tf.uint8))
    blended = tf.cast(degenerate, tf.float32) + factor * (tf.cast(pixels, tf.float32) - tf.cast(degenerate, tf.float32))
    expected = tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8).numpy()
    out = np.asarray(OPS["Contrast"](Image.fromarray(pixels), float(magnitude), np.random.default_rng(0)))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("kind", ["png_16_bit", "tiff_32_bit_int", "tiff_float_unit"])
def test_high_bit_depth_grayscale_is_scaled_not_clipped(kind, antialias):
    """Pillow's convert("RGB") clips 16-bit and float pixels to 255: images came out white (or black)."""
    ramp = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) * 16  # 0 .. 65520
    image = {"png_16_bit": lambda: Image.fromarray(ramp.astype(np.uint16)),
             "tiff_32_bit_int": lambda: Image.fromarray(ramp.astype(np.int32)),
             "tiff_float_unit": lambda: Image.fromarray((ramp / 65535).astype(np.float32))}[kind]()
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if kind.startswith("png") else "TIFF")
    decoded = preprocess.open_image(buffer.getvalue())
    pixels = preprocess.crop_and_resize(decoded, preprocess.central_box(*decoded.size, 1.0), 64, antialias)
    expected = np.rint(ramp / 257.0)  # the same ramp in 8 bits, computed apart from pillow
    assert pixels.shape == (64, 64, 3)
    np.testing.assert_allclose(pixels[..., 0], expected, atol=1)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
