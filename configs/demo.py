"""The embedded default: a small ViT trained on scikit-learn's digits on a CPU in a few minutes.

  python -m vit_jax.main --config=configs/demo.py --workdir=workdir/demo     (what `make demo` runs)

Digits are 8x8 grey images (1,797 of them, shipped with scikit-learn), built into a TFDS dataset at
first use, resized to 16x16 RGB and cut into 4x4 patches: 16 tokens plus the class token.
Global batch 64 = per-device batch x devices; 1,500 AdamW steps with warmup and cosine decay.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    """Width 128, depth 4, 4 heads, patch 4 on 16x16 digits."""
    config = common.get_config("Ti/16")
    model = config.model
    model.variant = "custom"
    model.hidden_size = 128
    model.num_layers = 4
    model.num_heads = 4
    model.mlp_dim = 256
    model.patch_size = 4
    model.dropout_rate = 0.0

    config.dataset = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.num_classes = 10
    config.image_size = 16
    config.pp.inception_crop = False
    config.pp.flip = False  # a flipped digit is another digit (or none)
    config.pp.random_translate = 1

    config.batch_size = 64
    config.eval_batch_size = 128
    config.total_steps = 1500
    config.num_epochs = 0  # the run is measured in steps
    config.eval_every = 500
    config.log_every = 100
    config.checkpoint_every = 500
    config.keep_checkpoints = 2

    config.optimizer.name = "adam"
    config.optimizer.lr = 1e-3
    config.optimizer.weight_decay = 1e-4  # x lr (configs/common.py): ~1e-7 per step, next to nothing
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 100
    return config
