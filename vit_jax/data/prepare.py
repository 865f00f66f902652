"""`python -m vit_jax.data.prepare --dataset=NAME --data_dir=DIR [--manual_dir=DIR]`: build a dataset for grain.

Writes TFDS ArrayRecord files (what `tfds.data_source` and grain read) into DIR/NAME/VERSION:
  --dataset=cifar10 (any TFDS name; downloads)           --dataset=imagenet2012 --manual_dir=<ILSVRC2012 tars>
  --dataset=imagenet21k --manual_dir=<ImageNet-21k>       --dataset=image_folder --manual_dir=<your images>
  --dataset=digits (no download; also built on first use)
Then train with --config.dataset=NAME --config.tfds_data_dir=DIR.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from vit_jax import cli
from vit_jax.data.datasets import prepare

_DATASET = flags.DEFINE_string("dataset", None, "TFDS name or one of ours: digits, imagenet21k, image_folder.",
                               required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where to write it; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Manually downloaded archives / your own image folder.")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    path = prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)
    print(f"prepared {_DATASET.value} in {path}")


if __name__ == "__main__":
    cli.run(main)
