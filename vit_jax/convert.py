"""`python -m vit_jax.convert`: convert a checkpoint between official .npz, timm, HF and our orbax format.

  python -m vit_jax.convert --src=ViT-B_16.npz --config=configs/vit_b16.py --out=/tmp/b16_ckpt --to=orbax
  python -m vit_jax.convert --src=/tmp/ft/checkpoints --config=configs/finetune.py:cifar10 \
      --out=vit_b16_cifar10.safetensors --to=timm
  python -m vit_jax.convert --src=/tmp/ft/checkpoints --config=configs/finetune.py:cifar10 --out=hf_dir --to=hf

The config gives the architecture (`config.model`); the source's format is detected from the file
(`--from` forces it). The head and resolution are the checkpoint's own unless `--num_classes` /
`--image_size` ask for others (a new zero head; resized position embeddings); without `--num_classes`, a head the
--config model cannot use as is (its pre_logits dropped by representation_size=0) is an error, not a new zero
head that would score chance. Nothing is overwritten: --out is a new .npz / .safetensors file (npz, timm) or a
new or empty directory (hf, orbax). An HF export of a sigmoid model (`label_kind="multi"`, from the config or
recorded by the source's training run) says `problem_type: multi_label_classification`, so HF reads its logits so.
Bad input: one line, exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from vit_jax import cli, config_check
from vit_jax.errors import UserError
from vit_jax.interop import (
    SOURCE_FORMATS,
    TARGET_FORMATS,
    check_destination,
    load_pretrained,
    recorded_run_config,
    save_as,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b16.py.", lock_config=True)
_SRC = flags.DEFINE_string("src", None, "Checkpoint to read: .npz, .safetensors/.bin/.pth, HF or orbax dir.")
_OUT = flags.DEFINE_string("out", None, "Where to write: a file (npz, timm) or a new directory (hf, orbax).")
_TO = flags.DEFINE_enum("to", None, list(TARGET_FORMATS), "Target format.")
_FROM = flags.DEFINE_enum("from", "auto", ["auto", *SOURCE_FORMATS], "Source format (auto: detect).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "New head with this many classes (0: keep the source's).",
                                    lower_bound=0)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Resize position embeddings for this resolution "
                                   "(0: keep the source's).", lower_bound=0)
_RESIZE = flags.DEFINE_enum("resize_method", "bilinear", ["bilinear", "bicubic"],
                            "Position-embedding interpolation: bilinear (the paper's code, big_vision), or "
                            "bicubic without antialiasing (HF's interpolate_pos_encoding; timm's loader "
                            "antialiases, which differs when shrinking).")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    model_config = _CONFIG.value.model
    # The architecture first (a bad --config.model.* is one line, not a traceback from the model); the patch size
    # stands for any resolution it divides: --image_size is checked after, as the flag it is (config.image_size is
    # not used here: the source's resolution is kept without --image_size).
    config_check.validate_model(model_config, model_config.patch_size)
    problem = _IMAGE_SIZE.value and config_check.image_size_problem(_IMAGE_SIZE.value, model_config.patch_size)
    if problem:
        raise UserError(f"--image_size={_IMAGE_SIZE.value} is invalid: {problem}")
    config_check.validate_label_kind(_CONFIG.value)
    source, out = cli.local_path(_SRC.value), cli.local_path(_OUT.value)  # a shell leaves `~` in --out=~/x alone
    check_destination(out, _TO.value)  # before reading: a bad --out costs nothing and overwrites nothing
    # Without --num_classes the head is the checkpoint's own: if it cannot serve the --config model (its input,
    # pre_logits, dropped by representation_size=0, or a fresh pre_logits under it), a new zero head would write a
    # classifier scoring chance, so surgery's one-line error instead. --num_classes asks for a new head on purpose.
    source_format = None if _FROM.value == "auto" else _FROM.value
    params = load_pretrained(source, model_config, num_classes=_NUM_CLASSES.value or None,
                             image_size=_IMAGE_SIZE.value or None, source_format=source_format,
                             resize_method=_RESIZE.value, require_head=not _NUM_CLASSES.value)
    # An HF export says how its logits are read (problem_type): the kind the source's run recorded, else the config's.
    config_check.adopt_recorded_label_kind(_CONFIG.value, recorded_run_config(source, source_format), source)
    written = save_as(params, model_config, out, _TO.value, label_kind=_CONFIG.value.label_kind)
    print(f"wrote {written} ({_TO.value})")


if __name__ == "__main__":
    for name in ("config", "src", "out", "to"):
        flags.mark_flag_as_required(name)
    cli.run(main)
