"""Masked patch prediction on digits: the paper's self-supervised pre-training (vit_jax/masked_patch.py), on a CPU.

  python -m vit_jax.main --config=configs/demo_mpp.py --workdir=workdir/mpp
  python -m vit_jax.main --config=configs/demo_finetune.py --workdir=workdir/mpp_ft \
      --config.pretrained=workdir/mpp --config.image_size=16

configs/demo.py's model and data (16x16 digits, patch 4: 16 patches, 8 of them corrupted per image) trained,
without labels, to predict the 3-bit mean colour (512 classes; digits are grey, so only 8 occur) of each
corrupted patch. The checkpoint has the encoder plus `mask_embedding` and `masked_patch_head` and no
classification head: fine-tuning (configs/demo_finetune.py) drops the two and starts a new zero head.
docs/finetune_report.md compares this against training the classifier from scratch for the same number of steps.
"""

import ml_collections

from configs import demo

PRETRAIN_STEPS = 600


def get_config() -> ml_collections.ConfigDict:
    """configs/demo.py with objective='masked_patch_prediction' and 600 steps."""
    config = demo.get_config()
    config.objective = "masked_patch_prediction"
    config.total_steps = PRETRAIN_STEPS
    config.num_epochs = 0  # the run is measured in steps
    config.eval_every = config.checkpoint_every = PRETRAIN_STEPS
    config.keep_checkpoints = 1
    return config
