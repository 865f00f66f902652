"""The fine-tuning demo on digits: pre-train at 16px, fine-tune at 32px with the paper's recipe, on a CPU.

  python -m vit_jax.main --config=configs/demo_finetune.py:pretrain --workdir=workdir/ft_pre
  python -m vit_jax.main --config=configs/demo_finetune.py --workdir=workdir/ft_before \
      --config.pretrained=workdir/ft_pre --mode=eval \
      --config.model.representation_size=128                  # before: its own head at 32px, 76.09%
  python -m vit_jax.main --config=configs/demo_finetune.py --workdir=workdir/ft \
      --config.pretrained=workdir/ft_pre                      # after: fine-tuned at 32px, 99.33%

`pretrain` is configs/demo.py (16x16 digits, patch 4: a 4x4 grid) with the paper's pre-training head, a tanh
`pre_logits` layer (representation_size = hidden size), and fewer steps. The default config fine-tunes the
same architecture at 32x32 (an 8x8 grid) the way the paper fine-tunes at 384px: `config.pretrained` is read by
vit_jax.interop, which drops `pre_logits` and so starts a new zero-initialised head (every logit 0: chance
accuracy before fine-tuning) and resizes the position embeddings from the 4x4 to the 8x8 grid (bilinear, class
token kept apart); then SGD with momentum 0.9, global-norm clip 1, no weight decay, cosine decay after a short
warmup (configs/finetune.py's recipe, scaled to 1,500 images: batch 128 instead of 512, 300 steps).
`config.pretrained` may point at the pre-training workdir, its `checkpoints/` or one step directory. The "before"
evaluation keeps the pre-trained classifier (`representation_size=128` keeps its pre_logits, which feed its head;
`--mode=eval` refuses a new zero head, which would score chance) at 32px, with the position embeddings resized,
in a workdir of its own (`--mode=eval` evaluates a workdir's own checkpoint when it has one). Figures: digits
1.1.0, shuffle seed 0 (pre-training: 97.31%; session 23's draw of a fresh model, `vit_jax.train.init_params`).
Measured figures and the masked-patch comparison: docs/finetune_report.md.

The same fine-tuning config starts from a masked-patch-prediction checkpoint (configs/demo_mpp.py), which has
no head at all; `--config.image_size=16` fine-tunes at the pre-training resolution instead.
"""

import ml_collections

from configs import demo
from vit_jax.config_check import ConfigError

PRETRAIN_STEPS = 600
FINETUNE_STEPS = 300


def get_config(arg: str = "finetune") -> ml_collections.ConfigDict:
    """`pretrain`: 16px pre-training with a pre-logits layer; `finetune` (default): 32px fine-tuning."""
    if arg not in ("pretrain", "finetune"):
        raise ConfigError(f"configs/demo_finetune.py: unknown argument {arg!r}; valid: 'pretrain', 'finetune'")
    config = demo.get_config()
    if arg == "pretrain":
        config.model.representation_size = config.model.hidden_size  # as the paper's ImageNet-21k pre-training
        config.total_steps = PRETRAIN_STEPS
        config.eval_every = config.checkpoint_every = PRETRAIN_STEPS
        config.keep_checkpoints = 1
        return config

    config.image_size = 32
    config.pp.random_translate = 2  # the same shift relative to the digit as 1px at 16px
    config.model.representation_size = 0  # the pre-logits layer of pre-training is dropped -> new zero head
    config.batch_size = 128
    config.eval_batch_size = 128
    config.total_steps = FINETUNE_STEPS
    config.eval_every = 100
    config.log_every = 50
    config.checkpoint_every = FINETUNE_STEPS
    config.keep_checkpoints = 1

    opt = config.optimizer
    opt.name = "sgd"
    opt.momentum = 0.9
    opt.lr = 0.03
    opt.weight_decay = 0.0
    opt.grad_clip_norm = 1.0
    opt.schedule = "cosine"
    opt.warmup_steps = 30
    return config
