"""RandAugment (Cubuk et al. 2019) on pillow images, as in the AugReg runs ("How to train your ViT").

Follows the TensorFlow reference (`distort_image_with_randaugment` of the EfficientNet code, which big_vision
uses): each of `num_layers` rounds applies one op drawn uniformly from 16, at `magnitude` on a 0..10 scale
(larger values extrapolate); geometric ops fill with grey (128). Pixel translations and the cutout size are
given relative to the image (the reference's 100 and 40 px at 224). Its quirks are kept, since the AugReg
checkpoints were trained with them: Solarize's threshold wraps at 256, Contrast blends towards pixel count / 256.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _blend_factor(level: float) -> float:
    """The enhancement ops' blend factor: 0.1 (towards the degenerate image) .. 1.9 (away from it)."""
    return level / MAX_LEVEL * 1.8 + 0.1


def _enhance(enhancer):
    return lambda image, level, rng: enhancer(image).enhance(_blend_factor(level))


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.NEAREST,
                           fillcolor=FILL)


def _shear(image: Image.Image, shear: float, horizontal: bool) -> Image.Image:
    # The reference maps output pixel (x, y) to input (x + shear * y, y) in pixel indices (centres at integers);
    # pillow has corners at integers and maps the centre (x + 0.5, y + 0.5), adding shear / 2: taken back here.
    if horizontal:
        return _affine(image, (1, shear, -shear / 2, 0, 1, 0))
    return _affine(image, (1, 0, 0, shear, 1, -shear / 2))


def _solarize(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    # The reference compares uint8 pixels with a threshold cast to uint8, which wraps: 256 -> 0 (magnitudes 10 and
    # 20 invert the whole image), 384 -> 128 (google-research/big_vision#110). Pillow keeps every pixel at >= 256.
    return ImageOps.solarize(image, int(level / MAX_LEVEL * 256) % 256)


def _contrast(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    # The reference blends towards a grey of histogram total / 256 (pixel count / 256, capped at 255; 196 at
    # 224 px), not the mean grey level as pillow's ImageEnhance.Contrast, then truncates to uint8 as its `blend`.
    pixels = np.asarray(image, np.float32)
    grey = np.float32(np.floor(min(255.0, pixels.shape[0] * pixels.shape[1] / 256.0)))
    blended = grey + _blend_factor(level) * (pixels - grey)
    return Image.fromarray(np.clip(blended, 0.0, 255.0).astype(np.uint8))


def _solarize_add(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image).astype(np.int32)
    added = np.clip(pixels + int(level / MAX_LEVEL * 110), 0, 255)
    return Image.fromarray(np.where(pixels < 128, added, pixels).astype(np.uint8))


def _cutout(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.array(image)
    height, width = pixels.shape[:2]
    half = int(level / MAX_LEVEL * 40 / 224 * min(height, width))
    y, x = int(rng.integers(height)), int(rng.integers(width))
    pixels[max(0, y - half):y + half, max(0, x - half):x + half] = FILL
    return Image.fromarray(pixels)


OPS = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": lambda image, level, rng: image.rotate(_signed(level / MAX_LEVEL * 30.0, rng), fillcolor=FILL),
    # Bits kept: 4 at magnitude 10, 8 at 20. From 22.5 the reference shifts by 8 - bits < 0, undefined in C++
    # (TF 2.21 keeps only the top bit); pillow raised. A deliberate departure: the image is kept, all 8 bits.
    "Posterize": lambda image, level, rng: ImageOps.posterize(image, min(8, max(1, int(level / MAX_LEVEL * 4)))),
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _contrast,
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng: _shear(image, _signed(level / MAX_LEVEL * 0.3, rng), horizontal=True),
    "ShearY": lambda image, level, rng: _shear(image, _signed(level / MAX_LEVEL * 0.3, rng), horizontal=False),
    "TranslateX": lambda image, level, rng: _affine(
        image, (1, 0, _signed(level / MAX_LEVEL * 100 / 224 * image.width, rng), 0, 1, 0)),
    "TranslateY": lambda image, level, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * 100 / 224 * image.height, rng))),
    "Cutout": _cutout,
}
OP_NAMES = tuple(OPS)


def randaugment(image: Image.Image, num_layers: int, magnitude: float, rng: np.random.Generator) -> Image.Image:
    """Apply `num_layers` ops drawn uniformly from `OPS`, each at `magnitude` (0..10), to an RGB image."""
    for _ in range(num_layers):
        image = OPS[OP_NAMES[int(rng.integers(len(OP_NAMES)))]](image, float(magnitude), rng)
    return image
