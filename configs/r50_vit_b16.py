"""R50+ViT-B/16 (98,659,112 parameters with a 1000-class head): ImageNet-21k pre-training at 224px.

  python -m vit_jax.main --config=configs/r50_vit_b16.py --workdir=/tmp/r50_vit_b16

Global batch 4096 = per-device batch x (mesh.data x mesh.fsdp) x accum_steps; override any field,
e.g. ImageNet-1k from scratch with the paper's Table 3 recipe: `--config.dataset=imagenet2012
--config.num_classes=1000 --config.num_epochs=300 --config.optimizer.lr=3e-3 --config.optimizer.schedule=cosine
--config.optimizer.weight_decay=0.3` (fine-tuning at a higher resolution: configs/finetune.py).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    """The paper's ImageNet-21k pre-training recipe (its B and L rows, Table 3) applied to R50+ViT-B/16."""
    config = common.get_config("R50+B/16")
    return config
