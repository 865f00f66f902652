"""ViT-B/16 masked patch prediction with the paper's self-supervised recipe (appendix B.1.2).

  python -m vit_jax.main --config=configs/vit_b16_mpp.py --workdir=gs://bucket/b16_mpp \
      --config.dataset=image_folder --config.tfds_data_dir=... --config.num_classes=N   # JFT in the paper

The labels are not trained on, but the dataset is still checked against `num_classes` (and `label_kind`).

Adam at a base learning rate of 2e-4, 10k warmup steps, cosine decay, 1M steps at batch 4096 (about 14 epochs of
JFT-300M); 50% of the patches corrupted (80% mask token, 10% another patch, 10% kept), the 3-bit mean colour of
each predicted (vit_jax/masked_patch.py). The paper does not give its weight decay, dropout or clipping here:
dropout is 0, as in its JFT pre-training recipe (Table 3), which this runs on; weight decay and global-norm
clipping at 1 keep the ImageNet-21k defaults (configs/common.py). Fine-tune with configs/finetune.py and
--config.pretrained=WORKDIR.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    """configs/vit_b16.py with objective='masked_patch_prediction' and the paper's optimizer for it."""
    config = common.get_config("B/16")
    config.objective = "masked_patch_prediction"
    config.total_steps = 1_000_000
    config.num_epochs = 0  # the run is measured in steps
    config.optimizer.name = "adam"
    config.optimizer.lr = 2e-4
    config.optimizer.warmup_steps = 10_000
    config.optimizer.schedule = "cosine"
    config.model.dropout_rate = 0.0  # JFT's pre-training recipe (Table 3); common.py's 0.1 is ImageNet-21k's
    return config
