"""ViT-H/14 (632,045,800 parameters with a 1000-class head): ImageNet-21k pre-training at 224px.

  python -m vit_jax.main --config=configs/vit_h14.py --workdir=/tmp/vit_h14

Global batch 4096 = per-device batch x (mesh.data x mesh.fsdp) x accum_steps; override any field,
e.g. ImageNet-1k from scratch with the paper's Table 3 recipe: `--config.dataset=imagenet2012
--config.num_classes=1000 --config.num_epochs=300 --config.optimizer.lr=3e-3 --config.optimizer.schedule=cosine
--config.optimizer.weight_decay=0.3` (fine-tuning at a higher resolution: configs/finetune.py).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    """The paper's ImageNet-21k pre-training recipe (its B and L rows, Table 3) applied to ViT-H/14."""
    config = common.get_config("H/14")
    # 32 blocks of width 1280: recompute activations per block so batch 4096 fits on a pod slice.
    config.model.remat = True

    return config
