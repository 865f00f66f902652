"""Preprocessing as in the paper's code, as plain typed functions on pillow images and numpy arrays.

train: decode -> Inception crop (random resized crop) -> resize to image_size -> horizontal flip
       [-> random translation (small images) -> RandAugment] -> values in [-1, 1]
       (`inception_crop=False` resizes the whole image to image_size, with no random crop at all; the paper's
       code then resized to 512 and took a random 384 crop, which is not done here)
eval:  decode -> resize to image_size / eval_crop_fraction -> central crop image_size -> values in [-1, 1]
       (both sides are resized alike: the aspect ratio is not kept, as in the paper's code; big_vision's
       resize_small|central_crop and timm's crop_pct resize the short side)
labels: one-hot (one class per image) or multi-hot (several); mixup mixes whole batches.

Resizing is tf.image.resize's bilinear without antialiasing by default, as the paper's code (`antialias=True`:
crop and resize in one pillow call on the region of interest, with its antialiased filter, after JPEG "draft"
decoding at the smallest 1/2, 1/4 or 1/8 scale that still covers the output: faster on large photos).
Images stay uint8 until the batch is assembled: 4x less to move between worker processes. Resized values are
rounded to the nearest uint8: within half a level (<= 0.004 in [-1, 1]) of the paper's code, which keeps
tf.image.resize's floats; big_vision casts them to uint8, which truncates (up to one level below the float).
A file that cannot be decoded raises `CorruptImageError`; the pipeline skips it and logs the count.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

from vit_jax.data.errors import DatasetError
from vit_jax.data.randaugment import randaugment

# The Inception crop of the paper's code: tf.image.sample_distorted_bounding_box's default aspect ratios and tries.
ASPECT_RATIO_RANGE = (0.75, 1.33)
CROP_ATTEMPTS = 100
Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels

_skipped_images = 0
_logged_images: set[tuple[str, int]] = set()  # (split kind, example index) of the skips logged in this process


class CorruptImageError(ValueError):
    """Image bytes that pillow cannot decode (truncated, not an image, too large)."""


def corrupt_images_skipped() -> int:
    """How many corrupt images this process has skipped so far."""
    return _skipped_images


def record_corrupt_image(index: int, error: Exception, kind: str) -> None:
    """Count a skipped image; log it with the running count the first time (each epoch, and a tiny split's
    read-ahead, skip it again: one corrupt image of a 12-image split logged ~30 warnings in a few batches)."""
    global _skipped_images
    _skipped_images += 1
    if (kind, index) in _logged_images:
        return
    _logged_images.add((kind, index))
    logging.warning("skipped corrupt image (example %d of the %s split): %s; %d skipped so far in this process "
                    "(its later skips are counted, not logged)", index, kind, error, _skipped_images)


def open_image(data: bytes) -> Image.Image:
    """Parse the image header (pixels are decoded later, possibly at reduced scale); a photo whose EXIF
    orientation says it is stored rotated or mirrored (phones store portraits as landscape pixels) is decoded
    now and turned upright, so its size and pixels are those a viewer shows. (TF's decoder, the paper's, ignores
    the tag: only files that carry one differ.) Grayscale of more than 8 bits is decoded now too, and scaled to
    8 bits by the depth its file declares (see `_to_8_bits`), which turning it upright would lose."""
    try:
        image = Image.open(io.BytesIO(data))
        return _to_8_bits(_upright(image), _declared_top(image))
    except Image.UnidentifiedImageError:
        raise CorruptImageError(f"not an image: pillow recognises no image format in these {len(data)} bytes "
                                f"(they start {bytes(data[:12])!r})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {e}") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 (a damaged EXIF block: the pixels as stored)
        return image
    if orientation not in range(2, 9):  # 1: upright; other values are not orientations
        return image
    return ImageOps.exif_transpose(image)


def inception_crop_box(width: int, height: int, rng: np.random.Generator, min_area: float = 0.05,
                       max_area: float = 1.0) -> Box:
    """A random box covering [min_area, max_area] of the image, aspect ratio (width / height) in [0.75, 1.33].

    The sampling of `tf.image.sample_distorted_bounding_box(area_range=(min_area, max_area),
    min_object_covered=0, use_image_if_no_bounding_boxes=True)`, which the paper's code and big_vision crop
    with: an aspect ratio uniform in the range, then a height uniform between those of the smallest and the
    largest area that fits; up to 100 tries, else the whole image. (torchvision's RandomResizedCrop draws the
    area uniformly instead, and keeps larger crops: median area 0.41 of a 500x375 image against TF's 0.29.)
    """
    for _ in range(CROP_ATTEMPTS):
        aspect_ratio = rng.uniform(*ASPECT_RATIO_RANGE)
        box = _random_crop(width, height, min_area, max_area, aspect_ratio, rng)
        if box is not None:
            return box
    return (0, 0, width, height)


def _random_crop(width: int, height: int, min_area: float, max_area: float, aspect_ratio: float,
                 rng: np.random.Generator) -> Box | None:
    """One try of TF's GenerateRandomCrop (sample_distorted_bounding_box_op.cc), None when it fails."""
    min_pixels, max_pixels = min_area * width * height, max_area * width * height
    crop_height = round(math.sqrt(min_pixels / aspect_ratio))
    max_height = round(math.sqrt(max_pixels / aspect_ratio))
    if round(max_height * aspect_ratio) > width:  # the tallest box whose rounded width fits
        max_height = int((width + 0.5 - 1e-7) / aspect_ratio)
        if round(max_height * aspect_ratio) > width:
            max_height -= 1
    max_height = min(max_height, height)
    crop_height = min(crop_height, max_height)
    if crop_height < max_height:
        crop_height += int(rng.integers(0, max_height - crop_height + 1))
    crop_width = round(crop_height * aspect_ratio)
    if crop_width * crop_height < min_pixels:  # rounding: try one row taller, then one shorter
        crop_height += 1
        crop_width = round(crop_height * aspect_ratio)
    if crop_width * crop_height > max_pixels:
        crop_height -= 1
        crop_width = round(crop_height * aspect_ratio)
    area = crop_width * crop_height
    if not (min_pixels <= area <= max_pixels and 0 < crop_width <= width and 0 < crop_height <= height):
        return None
    # TF draws the offset in [0, free) (never the last position) and 0 when nothing is free.
    top = int(rng.integers(0, height - crop_height)) if crop_height < height else 0
    left = int(rng.integers(0, width - crop_width)) if crop_width < width else 0
    return (left, top, left + crop_width, top + crop_height)


def central_box(width: int, height: int, fraction: float) -> Box:
    """The central `fraction` of each side (fraction 1: the whole image)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"central crop fraction {fraction} is invalid: expected 0 < fraction <= 1")
    margin_x, margin_y = width * (1.0 - fraction) / 2.0, height * (1.0 - fraction) / 2.0
    return (margin_x, margin_y, width - margin_x, height - margin_y)


def _declared_top(image: Image.Image) -> float | None:
    """The largest sample value a TIFF declares: SMaxSampleValue (tag 341) when given, else 2**BitsPerSample - 1
    (tag 258) for integer samples; None for other formats and for a float TIFF without tag 341."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None

    def first(tag: int) -> float | None:
        value = tags.get(tag)
        value = value[0] if isinstance(value, tuple) and value else value
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    smax, bits = first(341), first(258)
    if smax:
        return smax
    return 2.0 ** bits - 1 if bits and image.mode != "F" else None


def _to_8_bits(image: Image.Image, top: float | None = None) -> Image.Image:
    """Single-channel images of more than 8 bits as 8-bit grayscale: pillow's convert("RGB") clips them to 255
    instead of scaling (a 16-bit PNG came out almost white, a float TIFF black).

    The scale depends on the image's mode and what its file declares (`top`, default `_declared_top`), never on
    its pixels (one bright pixel must not change the brightness of the rest): 0..top onto 0..255, where a float
    ("F") image without a declared maximum is read as 0..1, an integer one ("I;16*", "I") as 16-bit 0..65535
    (pillow gives PNG and PGM 16-bit values; a 12-bit camera TIFF declares 0..4095; a 32-bit TIFF's integers
    above 65535 are white). Values outside the range are clipped; NaN is black.
    """
    top = top or _declared_top(image)
    if image.mode == "F":
        top = top or 1.0
    elif image.mode == "I" or image.mode.startswith("I;16"):
        top = min(top or 65535.0, 65535.0)
    else:
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64)) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def crop_and_resize(image: Image.Image, box: Box, size: int, antialias: bool = False) -> np.ndarray:
    """Decode `image`, crop `box` and resize it to (size, size, 3) uint8 RGB, bilinear.

    `antialias`: pillow's filter, which widens when it shrinks (and JPEGs decoded at a reduced DCT scale: fast).
    Without: `tf.image.resize(method="bilinear", antialias=False)` of the box rounded to whole pixels, as the
    paper's code and big_vision resize (each output pixel from the 4 nearest source pixels).
    """
    resize = _crop_and_resize_with_pillow if antialias else _crop_and_resize_as_tf
    try:
        return resize(image, box, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image: {e}") from None


def _rgb(image: Image.Image) -> Image.Image:
    """Decoded 8-bit RGB (grayscale of more bits scaled, not clipped; `open_image` has scaled its own images,
    this is for an image opened elsewhere)."""
    image = _to_8_bits(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _crop_and_resize_with_pillow(image: Image.Image, box: Box, size: int) -> np.ndarray:
    full_width, full_height = image.size
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    scale_x = scale_y = 1.0
    if image.format == "JPEG":
        # Decode at the smallest DCT scale at which the box still has >= size pixels per side. The scale is the
        # one draft() reports (1/2, 1/4 or 1/8): the reduced size is rounded up (501 px at 1/8 is 63, not 62.625),
        # and dividing by it shifted the box towards the far edge.
        needed = (math.ceil(full_width * size / box_width), math.ceil(full_height * size / box_height))
        drafted = image.draft("RGB", needed)
        if drafted is not None:
            scale_x, scale_y = drafted[1][2] / full_width, drafted[1][3] / full_height
    scaled = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    # reducing_gap: shrink by an integer factor first when the box is much larger (~15% faster, same quality).
    resized = _rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=scaled, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def _crop_and_resize_as_tf(image: Image.Image, box: Box, size: int) -> np.ndarray:
    pixels = np.asarray(_rgb(image), dtype=np.uint8)
    height, width = pixels.shape[:2]
    left, top = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    right, bottom = max(round(box[2]), left + 1), max(round(box[3]), top + 1)  # at least one pixel
    return resize_bilinear(pixels[top:bottom, left:right], size)


def resize_bilinear(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) uint8: bilinear, half-pixel centres, no antialiasing (TF2's default)."""

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0, n_in - 1)
        low = np.floor(x).astype(np.int64)
        return low, np.minimum(low + 1, n_in - 1), (x - low).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = taps(pixels.shape[0]), taps(pixels.shape[1])
    source = pixels.astype(np.float32)
    rows = source[y0] * (1 - fy)[:, None, None] + source[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def flip_left_right(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror (H, W, C) `image` horizontally with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_translate(image: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift (H, W, C) `image` by up to `max_shift` pixels each way, filling with 0 (black, -1 after scaling)."""
    if max_shift <= 0:
        return image
    padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = (int(v) for v in rng.integers(0, 2 * max_shift + 1, size=2))
    return padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]


def eval_pixels(image: Image.Image, size: int, crop_fraction: float = 1.0, antialias: bool = False) -> np.ndarray:
    """One image as evaluation sees it: the central `crop_fraction` of each side resized to `size` (TF-style
    bilinear, or pillow's antialiased with `antialias`), float32 (size, size, 3) in [-1, 1]. For images from
    outside a dataset (predict, visualize)."""
    return to_unit_range(crop_and_resize(image, central_box(*image.size, crop_fraction), size, antialias))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (the paper's value range)."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def encode_label(label, num_classes: int) -> np.ndarray:
    """A class id -> one-hot, or a list/array of class ids -> multi-hot; float32 (num_classes,)."""
    ids = np.atleast_1d(np.asarray(label, dtype=np.int64))
    if ids.size and ids.min() == -1:
        raise DatasetError("an example has label -1, TFDS's mark of an unlabelled one (a test split, as "
                           "imagenet2012's 'test', or stl10's 'unlabelled'): train and evaluate on a labelled split")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"label {label} is outside [0, {num_classes}): is config.num_classes right?")
    encoded = np.zeros((num_classes,), np.float32)
    encoded[ids] = 1.0
    return encoded


def mixup(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """Mix a batch with itself rolled by one: one weight lam ~ Beta(alpha, alpha) per batch (as big_vision)."""
    lam = np.float32(rng.beta(alpha, alpha))
    mixed_images = lam * images + (1.0 - lam) * np.roll(images, 1, axis=0)
    mixed_labels = lam * labels + (1.0 - lam) * np.roll(labels, 1, axis=0)
    return mixed_images.astype(np.float32), mixed_labels.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainPreprocess:
    """One training example: {"image": bytes, "label", "index"} -> {"image": uint8 (S, S, 3), "label": float32,
    "index"} (the example's position in its split, for logs and tests).

    Returns None for a corrupt image (counted and logged), which the pipeline drops.
    """

    image_size: int
    num_classes: int
    inception_crop: bool = True
    crop_min_area: float = 0.05
    flip: bool = True
    random_translate: int = 0
    randaugment_layers: int = 0
    randaugment_magnitude: float = 10.0
    antialias: bool = False

    def __call__(self, example: dict, rng: np.random.Generator) -> dict | None:
        try:
            image = open_image(example["image"])
            width, height = image.size
            box = (inception_crop_box(width, height, rng, self.crop_min_area) if self.inception_crop
                   else (0, 0, width, height))
            pixels = crop_and_resize(image, box, self.image_size, self.antialias)
        except CorruptImageError as e:
            record_corrupt_image(int(example["index"]), e, "training")
            return None
        if self.flip:
            pixels = flip_left_right(pixels, rng)
        pixels = random_translate(pixels, self.random_translate, rng)
        if self.randaugment_layers:
            augmented = randaugment(Image.fromarray(np.ascontiguousarray(pixels)), self.randaugment_layers,
                                    self.randaugment_magnitude, rng)
            pixels = np.asarray(augmented, dtype=np.uint8)
        return {"image": np.ascontiguousarray(pixels), "label": encode_label(example["label"], self.num_classes),
                "index": np.int64(example["index"])}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
    """One eval example, deterministic: resize to image_size / crop_fraction, central crop image_size.

    Output as `TrainPreprocess` plus "mask" 1.0 (real example); None for a corrupt image.
    """

    image_size: int
    num_classes: int
    crop_fraction: float = 1.0
    antialias: bool = False

    def __call__(self, example: dict) -> dict | None:
        try:
            image = open_image(example["image"])
            pixels = crop_and_resize(image, central_box(*image.size, self.crop_fraction), self.image_size,
                                     self.antialias)
        except CorruptImageError as e:
            record_corrupt_image(int(example["index"]), e, "evaluation")
            return None
        return {"image": pixels, "label": encode_label(example["label"], self.num_classes),
                "mask": np.float32(1.0), "index": np.int64(example["index"])}

    def empty_batch(self) -> dict[str, np.ndarray]:
        """Zero rows of each key, with the shapes and dtypes a batch of this transform's outputs has."""
        size = self.image_size
        return {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0, self.num_classes), np.float32),
                "mask": np.zeros((0,), np.float32), "index": np.zeros((0,), np.int64)}


@dataclasses.dataclass(frozen=True)
class MixupBatch:
    """Batch-level mixup (grain random_map on batches): images become float32 in [-1, 1]."""

    alpha: float

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        images, labels = mixup(to_unit_range(batch["image"]), batch["label"], self.alpha, rng)
        return {**batch, "image": images, "label": labels}
