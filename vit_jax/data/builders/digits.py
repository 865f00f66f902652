"""`digits`: scikit-learn's 1,797 handwritten digits as a TFDS image dataset, built offline in about a second.

The embedded default dataset (configs/demo.py). Images are 8x8 grey, scikit-learn's 0..16 intensities scaled to
0..255 and stored as PNG bytes (encoded with pillow, so building needs neither tensorflow nor a download).
Splits follow the demo: `train` = the first 1,500 digits, `test` = the last 297.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_TRAIN = 1500


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) uint8 images in 0..255 and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's handwritten digits (8x8 grey, 10 classes); no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train = first 1500, test = last 297 of sklearn's 1797 digits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's handwritten digits (UCI optical recognition), 8x8 grey.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        images, labels = load_digits_uint8()
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], offset=0),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], offset=NUM_TRAIN),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, offset: int):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield offset + i, {"image": _png_bytes(image[..., None].squeeze(-1)), "label": int(label)}
