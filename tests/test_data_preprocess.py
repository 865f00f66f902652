"""Preprocessing: Inception crop, resize, flip, translation, eval crop, labels, mixup, RandAugment."""

import io
import math
import struct

import numpy as np
import pytest
from PIL import Image

from vit_jax.data import preprocess
from vit_jax.data.errors import DatasetError
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
    # The central half of each side, resized as TF does (the default, pp.antialias=False): only the white centre.
    tf = pytest.importorskip("tensorflow")
    reference = tf.image.resize(tf.image.crop_to_bounding_box(pixels, 50, 50, 100, 100), (40, 40),
                                method="bilinear", antialias=False).numpy()
    assert np.abs(centre - reference).max() <= 0.51 and centre.min() == 255
    with pytest.raises(ValueError, match="fraction 1.5 is invalid"):
        preprocess.central_box(10, 10, 1.5)


# EXIF orientation -> the numpy turn of the stored pixels a viewer shows (rows first: height, width).
UPRIGHT = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
           2: lambda a: a[:, ::-1]}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
@pytest.mark.parametrize("antialias", [False, True])
def test_a_photo_tagged_as_rotated_is_turned_upright(orientation, antialias):
    """A phone portrait: landscape pixels and an EXIF orientation. It is cropped and resized as a viewer shows it:
    the same pixels as an untagged file of the upright image."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:20, :40] = 255  # white top-left quadrant: every turn puts it in another corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged, upright = io.BytesIO(), io.BytesIO()
    Image.fromarray(stored).save(tagged, format="PNG", exif=exif)
    Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](stored))).save(upright, format="PNG")
    image = preprocess.open_image(tagged.getvalue())
    assert image.size == (40, 80) if orientation in (6, 8) else image.size == (80, 40)
    np.testing.assert_array_equal(preprocess.eval_pixels(image, 8, antialias=antialias),
                                  preprocess.eval_pixels(preprocess.open_image(upright.getvalue()), 8,
                                                         antialias=antialias))


def test_labels_one_hot_and_multi_hot_and_out_of_range():
    np.testing.assert_array_equal(preprocess.encode_label(2, 4), [0, 0, 1, 0])
    np.testing.assert_array_equal(preprocess.encode_label(np.array([0, 3]), 4), [1, 0, 0, 1])
    np.testing.assert_array_equal(preprocess.encode_label(np.array([], np.int64), 3), [0, 0, 0])
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 4\)"):
        preprocess.encode_label(7, 4)
    with pytest.raises(DatasetError, match=r"an example has label -1, TFDS's mark of an unlabelled one"):
        preprocess.encode_label(-1, 4)


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


# The TF reference below is `distort_image_with_randaugment` of big_vision/pp/autoaugment.py, a fork of tensorflow/tpu
# models/official/efficientnet/autoaugment.py (tensorflow/models official/vision/ops/augment.py has the same op
# formulas). Its constants: `_MAX_LEVEL = 10.`, HParams(cutout_const=40, translate_const=100), replace_value [128] * 3.
_REF_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast", "Brightness",
            "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
_REF_MAX_LEVEL, _REF_TRANSLATE_CONST, _REF_CUTOUT_CONST, _REF_REPLACE = 10.0, 100, 40, 128


def _ra_pixels(height: int = 24, width: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _low_contrast(seed: int = 1) -> np.ndarray:
    """Channels spanning 40..125 and 100..163, and a constant one: autocontrast and equalize have work to do."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(40, 126, (24, 24)), rng.integers(100, 164, (24, 24)), np.full((24, 24), 77)],
                    axis=-1).astype(np.uint8)


def _ours(op: str, pixels: np.ndarray, magnitude: float, seed: int = 0) -> np.ndarray:
    return np.asarray(OPS[op](Image.fromarray(pixels), float(magnitude), np.random.default_rng(seed)))


def _ref_enhance_factor(magnitude: float) -> float:
    return magnitude / _REF_MAX_LEVEL * 1.8 + 0.1  # the reference's `_enhance_level_to_arg`


def _ref_blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """The reference's `blend`: image1 + factor * (image2 - image1) in float32, clipped, truncated to uint8."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    image1, image2 = image1.astype(np.float32), image2.astype(np.float32)
    return np.clip(image1 + np.float32(factor) * (image2 - image1), 0.0, 255.0).astype(np.uint8)


def _ref_invert(pixels, magnitude):
    return 255 - pixels  # `invert`


def _ref_posterize(pixels, magnitude):
    """`posterize(image, bits=int(level / 10 * 4))`: left_shift(right_shift(image, 8 - bits), 8 - bits), in TF.

    TF (2.21) shifts uint8 by 8, or by a negative amount, as by 7: bits=0 (M < 2.5) and bits > 8 (M >= 22.5) both
    keep only the top bit."""
    tf = pytest.importorskip("tensorflow")
    shift = 8 - int(magnitude / _REF_MAX_LEVEL * 4)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(tf.constant(pixels), shift), shift).numpy()


def _ref_solarize_add(pixels, magnitude):
    """`solarize_add(image, addition=int(level / 10 * 110), threshold=128)`."""
    added = np.clip(pixels.astype(np.int64) + int(magnitude / _REF_MAX_LEVEL * 110), 0, 255).astype(np.uint8)
    return np.where(pixels < 128, added, pixels)


def _ref_brightness(pixels, magnitude):
    return _ref_blend(np.zeros_like(pixels), pixels, _ref_enhance_factor(magnitude))  # `brightness`


def _ref_autocontrast(pixels, magnitude):
    """`autocontrast`: per channel, (x - lo) * 255 / (hi - lo) in float32, clipped and truncated; hi == lo: as is."""
    channels = []
    for channel in np.moveaxis(pixels, -1, 0):
        lo, hi = np.float32(channel.min()), np.float32(channel.max())
        if hi > lo:
            scale = np.float32(255.0) / (hi - lo)
            channel = np.clip(channel.astype(np.float32) * scale - lo * scale, 0.0, 255.0).astype(np.uint8)
        channels.append(channel)
    return np.stack(channels, axis=-1)


def _ref_equalize(pixels, magnitude):
    """`equalize`: per channel, step = (sum of the histogram - its last non-zero bin) // 255; step 0: as is; else
    lut = (cumsum(histogram) + step // 2) // step shifted right by one (lut[0] = 0), clipped to 0..255."""
    channels = []
    for channel in np.moveaxis(pixels, -1, 0):
        histogram = np.bincount(channel.ravel(), minlength=256)
        nonzero = histogram[histogram != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step:
            lut = np.clip(np.concatenate([[0], ((np.cumsum(histogram) + step // 2) // step)[:-1]]), 0, 255)
            channel = lut[channel].astype(np.uint8)
        channels.append(channel)
    return np.stack(channels, axis=-1)


_REF_PIXEL_OPS = {"Invert": _ref_invert, "Posterize": _ref_posterize, "SolarizeAdd": _ref_solarize_add,
                  "Brightness": _ref_brightness, "Equalize": _ref_equalize}


def _ref_transform(pixels: np.ndarray, transform) -> np.ndarray:
    """The reference's wrap -> tfa.image.transform (nearest, zeros outside) -> unwrap(replace=128), in TF.

    The transform maps each output pixel (x, y) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
    tf = pytest.importorskip("tensorflow")
    wrapped = np.concatenate([pixels, np.ones((*pixels.shape[:2], 1), np.uint8)], axis=-1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=wrapped[None], transforms=tf.constant([list(transform)], tf.float32),
        output_shape=tf.constant(pixels.shape[:2], tf.int32), fill_value=tf.constant(0.0, tf.float32),
        interpolation="NEAREST", fill_mode="CONSTANT").numpy()[0]
    return np.where(out[..., 3:] == 0, np.uint8(_REF_REPLACE), out[..., :3])


def _ref_geometric(op: str, pixels: np.ndarray, magnitude: float, sign: int, origin_offset: float = 0.0):
    """`rotate` (degrees = level / 10 * 30, about the image centre), `shear_x` / `shear_y` (level / 10 * 0.3), each
    negated by `_randomly_negate_tensor` half the time. `origin_offset` moves the shear's origin (not the reference)."""
    height, width = pixels.shape[:2]
    if op == "Rotate":  # tfa's angles_to_projective_transforms
        radians = sign * magnitude / _REF_MAX_LEVEL * 30.0 * math.pi / 180.0
        cos, sin = math.cos(radians), math.sin(radians)
        x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
        y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
        return _ref_transform(pixels, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])
    level = sign * magnitude / _REF_MAX_LEVEL * 0.3
    if op == "ShearX":
        return _ref_transform(pixels, [1.0, level, level * origin_offset, 0.0, 1.0, 0.0, 0.0, 0.0])
    return _ref_transform(pixels, [1.0, 0.0, 0.0, level, 1.0, level * origin_offset, 0.0, 0.0])


def _ref_translate(pixels: np.ndarray, shift: int, axis: int) -> np.ndarray:
    """`translate_x/y(image, pixels)`: output[x] = input[x + pixels] (the content moves by -pixels), grey outside."""
    out = np.full_like(pixels, _REF_REPLACE)
    size = pixels.shape[axis]
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(max(0, shift), size + min(0, shift)), slice(max(0, -shift), size - max(0, shift))
    out[tuple(dst)] = pixels[tuple(src)]
    return out


def _assert_seeds_give_each_of(op: str, pixels: np.ndarray, magnitude: float, expected: list, seeds: int = 8):
    """Each of `seeds` outputs equals one of `expected` (the reference at +parameter, -parameter); each one occurs."""
    expected = [e for i, e in enumerate(expected) if not any(np.array_equal(e, f) for f in expected[:i])]
    seen = set()
    for seed in range(seeds):
        out = _ours(op, pixels, magnitude, seed)
        differing = [np.mean(np.any(out != e, axis=-1)) for e in expected]
        assert min(differing) == 0, f"seed {seed}: {min(differing):.1%} of the pixels differ from the reference"
        seen.add(int(np.argmin(differing)))
    assert seen == set(range(len(expected))), "the parameter's sign is not drawn both ways"


def test_randaugment_draws_from_the_sixteen_ops_of_the_reference():
    assert sorted(OPS) == sorted(_REF_OPS)


@pytest.mark.parametrize("op, magnitude", [
    ("Invert", 10), ("Posterize", 1), ("Posterize", 5), ("Posterize", 10), ("Posterize", 15), ("Posterize", 20),
    ("SolarizeAdd", 3), ("SolarizeAdd", 10), ("SolarizeAdd", 15), ("Brightness", 0), ("Brightness", 3),
    ("Brightness", 5), ("Brightness", 10), ("Brightness", 15), ("Equalize", 10),
])
def test_randaugment_pixel_ops_equal_the_tf_reference(op, magnitude):
    for pixels in (_ra_pixels(), _low_contrast()):
        expected = _REF_PIXEL_OPS[op](pixels, magnitude)
        assert expected.dtype == np.uint8
        np.testing.assert_array_equal(_ours(op, pixels, magnitude), expected)


def test_randaugment_autocontrast_is_the_tf_reference_within_a_grey_level():
    """Where (x - lo) * 255 / (hi - lo) is a whole number, the reference (float32) and pillow's lut (float64) can
    truncate to either side of it: a channel spanning 100..163 maps 163 to 255 in TF and 254 in ours."""
    for pixels in (_ra_pixels(), _low_contrast(), _low_contrast(5)):
        difference = np.abs(_ours("AutoContrast", pixels, 10).astype(int) - _ref_autocontrast(pixels, 10))
        assert difference.max() <= 1 and difference.mean() < 0.05


@pytest.mark.parametrize("magnitude", [20, 25, 40])
def test_randaugment_posterize_from_magnitude_20_keeps_all_8_bits(magnitude):
    """The reference keeps int(M / 10 * 4) bits: all 8 at M=20. From 22.5 its shift 8 - bits < 0 is undefined
    (TF 2.21 keeps the top bit only) and pillow raised; ours keeps the image, a deliberate departure."""
    pixels = _ra_pixels()
    np.testing.assert_array_equal(_ours("Posterize", pixels, magnitude), pixels)


@pytest.mark.parametrize("magnitude", [0, 3, 5, 10])
def test_randaugment_color_is_the_tf_reference_within_a_grey_level(magnitude):
    """`color`: blend(grayscale_to_rgb(rgb_to_grayscale(image)), image, factor). TF's grey (0.2989, 0.587, 0.114,
    times 255.5, truncated) and pillow's L (0.299, 0.587, 0.114 in fixed point) differ by at most one level."""
    tf = pytest.importorskip("tensorflow")
    pixels = _ra_pixels()
    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(tf.constant(pixels))).numpy()
    expected = _ref_blend(grey, pixels, _ref_enhance_factor(magnitude)).astype(int)
    difference = np.abs(_ours("Color", pixels, magnitude).astype(int) - expected)
    assert difference.max() <= (0 if magnitude == 5 else 1)  # M=5: factor 1, the image itself
    assert difference.mean() < 0.3


@pytest.mark.parametrize("magnitude", [0, 3, 5, 10])
def test_randaugment_sharpness_is_the_tf_reference_within_a_grey_level(magnitude):
    """`sharpness`: blend(smoothed, image, factor), smoothed = the [[1,1,1],[1,5,1],[1,1,1]] / 13 filter (VALID,
    truncated to uint8) inside a one-pixel border of the original. Pillow's SMOOTH rounds instead of truncating."""
    pixels = _ra_pixels()
    x = pixels.astype(np.float64)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0
    smoothed = sum(kernel[i, j] * x[i:i + 22, j:j + 22] for i in range(3) for j in range(3))
    degenerate = pixels.copy()
    degenerate[1:-1, 1:-1] = np.clip(smoothed, 0.0, 255.0).astype(np.uint8)
    expected = _ref_blend(degenerate, pixels, _ref_enhance_factor(magnitude)).astype(int)
    difference = np.abs(_ours("Sharpness", pixels, magnitude).astype(int) - expected)
    assert difference.max() <= (0 if magnitude == 5 else 1)
    assert difference.mean() < 0.4


@pytest.mark.parametrize("op, magnitude, size", [
    ("Rotate", 0, (24, 24)), ("Rotate", 3, (24, 24)), ("Rotate", 10, (24, 24)), ("Rotate", 10, (20, 28)),
    ("ShearX", 0, (24, 24)), ("ShearY", 0, (24, 24)), ("ShearX", 3, (20, 28)), ("ShearY", 3, (20, 28)),
])
def test_randaugment_rotate_and_shear_equal_the_tf_reference_transform_for_either_sign(op, magnitude, size):
    """Over 8 seeds the outputs are exactly the reference's at +parameter and -parameter (both occur; one at M=0,
    the image itself), grey (128) where the source point lies outside the image."""
    pixels = _ra_pixels(*size)
    expected = [_ref_geometric(op, pixels, magnitude, sign) for sign in (1, -1)]
    _assert_seeds_give_each_of(op, pixels, magnitude, expected)
    if magnitude == 0:
        np.testing.assert_array_equal(expected[0], pixels)
        np.testing.assert_array_equal(expected[1], pixels)


@pytest.mark.parametrize("op, size", [("ShearX", (24, 24)), ("ShearY", (24, 24)), ("ShearX", (20, 28)),
                                      ("ShearY", (20, 28))])
def test_randaugment_shear_at_magnitude_10_equals_the_tf_reference_transform(op, size):
    """Pillow puts pixel corners at integers, the reference pixel centres: without the half-pixel correction 7%
    (+0.3) or 14% (-0.3) of the pixels came from the neighbouring column or row. Left out: the rows (ShearX) or columns
    (ShearY) where 0.3 x index is a half-integer, a tie between two source pixels that the reference breaks in
    float32 (0.3f x 5 rounds to exactly 1.5, then away from zero) and pillow in float64 (index 5, 15, 25)."""
    pixels = _ra_pixels(*size)
    index = np.arange(size[0] if op == "ShearX" else size[1])
    tie = np.isclose(np.mod(0.3 * index, 1.0), 0.5)
    keep = np.broadcast_to((~tie)[:, None] if op == "ShearX" else (~tie)[None, :], size)
    assert set(np.nonzero(tie)[0]) == {i for i in (5, 15, 25) if i < len(index)}
    seen = set()
    for seed in range(8):
        out = _ours(op, pixels, 10, seed)
        exact = [np.array_equal(out[keep], _ref_geometric(op, pixels, 10, sign)[keep]) for sign in (1, -1)]
        assert any(exact), f"seed {seed}: differs from the reference away from the tie rows"
        seen.add(exact.index(True))
    assert seen == {0, 1}
    positive = _ref_geometric(op, pixels, 10, 1)  # +0.3 has no tie to break: exact everywhere
    assert any(np.array_equal(_ours(op, pixels, 10, seed), positive) for seed in range(8))


@pytest.mark.parametrize("op, axis", [("TranslateX", 1), ("TranslateY", 0)])
@pytest.mark.parametrize("magnitude", [0, 3, 10])
def test_randaugment_translate_moves_by_the_reference_pixels_at_224_and_fills_grey(op, axis, magnitude):
    """`translate_x/y(image, pixels=±level / 10 * 100)`: at 224 px (where ours, relative to the size, equals the
    reference's absolute 100 px) the content moves by exactly 30 or 100 px either way; the vacated band is 128."""
    pixels = _ra_pixels(224, 224, seed=3)
    shift = int(round(magnitude / _REF_MAX_LEVEL * _REF_TRANSLATE_CONST))
    expected = [_ref_translate(pixels, sign * shift, axis) for sign in (1, -1)]
    _assert_seeds_give_each_of(op, pixels, magnitude, expected)
    for out in expected:
        grey = np.all(out == _REF_REPLACE, axis=-1)
        assert np.count_nonzero(grey.all(axis=1 - axis)) == shift  # whole grey columns (X) / rows (Y)


@pytest.mark.parametrize("magnitude", [5, 10])
def test_randaugment_cutout_greys_a_2_pad_square_at_224(magnitude):
    """`cutout(image, pad_size=int(level / 10 * 40), replace=128)`: the rows and columns [c - pad, c + pad) around
    a uniform centre, clipped to the image: 40x40 (M=5) or 80x80 (M=10) grey pixels away from the border."""
    pad = int(magnitude / _REF_MAX_LEVEL * _REF_CUTOUT_CONST)
    pixels = _ra_pixels(224, 224, seed=4) // 2  # no pixel is already 128
    interior = 0
    for seed in range(12):
        out = _ours("Cutout", pixels, magnitude, seed)
        grey = np.all(out == _REF_REPLACE, axis=-1)
        rows, cols = np.nonzero(grey.any(axis=1))[0], np.nonzero(grey.any(axis=0))[0]
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert grey[top:bottom, left:right].all() and np.count_nonzero(grey) == (bottom - top) * (right - left)
        np.testing.assert_array_equal(out[~grey], pixels[~grey])
        assert bottom - top <= 2 * pad and right - left <= 2 * pad
        if top > 0 and left > 0 and bottom < 224 and right < 224:
            interior += 1
            assert np.count_nonzero(grey) == (2 * pad) ** 2
    assert interior >= 3


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


def _tiff_12_bit(values: np.ndarray) -> bytes:
    """A grayscale TIFF declaring 12 bits per sample (as scientific cameras write), written by hand: pillow
    cannot write one. Two 12-bit samples pack into three bytes, so the width must be even."""
    height, width = values.shape
    pairs = values.astype(np.uint16).reshape(-1, 2)
    packed = np.stack([pairs[:, 0] >> 4, ((pairs[:, 0] & 15) << 4) | (pairs[:, 1] >> 8), pairs[:, 1] & 255],
                      axis=-1).astype(np.uint8).tobytes()
    short, long_ = 3, 4
    entries = [(256, short, width), (257, short, height), (258, short, 12), (259, short, 1), (262, short, 1),
               (273, long_, 0), (277, short, 1), (278, short, height), (279, long_, len(packed))]
    pixels_at = 8 + 2 + 12 * len(entries) + 4  # header, entry count, entries, next-IFD offset
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, pixels_at if tag == 273 else value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + packed


@pytest.mark.parametrize("kind, value, outlier, expected", [
    ("tiff_32_bit_int", 200, 300, 1),  # integers not declared <= 16 bits are 16-bit valued: 200 / 257
    ("tiff_float", 0.5, 2.0, 128),  # float is 0..1: an outlier above 1 is white, the rest unchanged
    ("pgm_16_bit", 51400, 65535, 200),  # pillow gives PGM 16-bit values
])
def test_the_scale_of_a_high_bit_image_does_not_depend_on_its_pixels(kind, value, outlier, expected):
    """An int32 image of 200 with one pixel of 300 came out ~1 (/257), without it 200; a float image of 0.5 with
    one pixel above 1 came out 0 (not x255), without it 128: one pixel set the brightness of the whole image."""
    def decoded(values: np.ndarray) -> np.ndarray:
        if kind == "pgm_16_bit":
            data = b"P5\n8 8\n65535\n" + values.astype(">u2").tobytes()
        else:
            buffer = io.BytesIO()
            Image.fromarray(values.astype(np.int32 if kind == "tiff_32_bit_int" else np.float32)).save(buffer, "TIFF")
            data = buffer.getvalue()
        image = preprocess.open_image(data)
        return preprocess.crop_and_resize(image, (0, 0, 8, 8), 8)[..., 0]

    plain = np.full((8, 8), value)
    with_outlier = plain.copy()
    with_outlier[0, 0] = outlier
    assert (decoded(plain) == expected).all()
    np.testing.assert_array_equal(decoded(with_outlier)[1:], decoded(plain)[1:])


def test_a_tiff_is_scaled_by_the_bits_per_sample_it_declares():
    """A 12-bit TIFF holds 0..4095 (in pillow's 16-bit mode): divided by 257 as 16-bit, it came out almost black."""
    ramp = np.arange(16 * 16).reshape(16, 16) * 16  # 0 .. 4080
    image = preprocess.open_image(_tiff_12_bit(ramp))
    pixels = preprocess.crop_and_resize(image, (0, 0, 16, 16), 16)
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp * 255 / 4095))


def test_a_float_tiff_declaring_its_maximum_is_scaled_by_it():
    """A float TIFF of 0..255 (SMaxSampleValue 255) read as 0..1 came out white."""
    from PIL import TiffImagePlugin

    ramp = np.arange(16 * 16, dtype=np.float32).reshape(16, 16) - 0.25  # -0.25 .. 254.75
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[341] = 255.0
    buffer = io.BytesIO()
    Image.fromarray(ramp, "F").save(buffer, "TIFF", tiffinfo=tags)
    pixels = preprocess.crop_and_resize(preprocess.open_image(buffer.getvalue()), (0, 0, 16, 16), 16)
    np.testing.assert_array_equal(pixels[..., 0], np.clip(np.rint(ramp), 0, 255))


def test_jpeg_draft_decoding_keeps_the_box_where_it_is():
    """The reduced DCT scale is exactly 1/8 (draft()'s box), not the rounded-up size over the full size: a 501 px
    wide JPEG at 1/8 is 63 px for 62.625, and the box was read shifted by up to 3 px at the far edge (7 levels
    off on this ramp, against a full decode)."""
    height, width, size = 375, 501, 32  # 1/8: 501 // 32 >= 8 and 375 // 32 >= 8
    row = np.clip(255 - (width - 1 - np.arange(width)) * 2, 0, 255)  # a steep ramp at the right edge
    pixels = np.repeat(np.repeat(row[None, :, None], height, axis=0), 3, axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, subsampling=0)
    box = (0, 0, width, height)
    drafted = preprocess.crop_and_resize(preprocess.open_image(buffer.getvalue()), box, size, antialias=True)
    fully_decoded = Image.fromarray(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    reference = preprocess.crop_and_resize(fully_decoded, box, size, antialias=True)
    assert np.abs(drafted.astype(int) - reference.astype(int)).max() <= 2
