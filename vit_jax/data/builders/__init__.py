"""TFDS builders we own, for datasets TFDS has none of: digits (embedded default), imagenet21k, image folders."""
