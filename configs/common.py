"""Every default of vit_jax in one place: the paper's ImageNet-21k pre-training recipe at 224px.

Model files (vit_b16.py, ...) call `get_config("B/16")`; the command line overrides any field:

  python -m vit_jax.main --config=configs/vit_b16.py --workdir=/tmp/b16 \
      --config.dataset=cifar10 --config.num_classes=10 --config.eval_split=test --config.batch_size=512 \
      --config.optimizer.lr=3e-3 --config.total_steps=20000 --config.optimizer.warmup_steps=1000

Batch arithmetic: `batch_size` is the global batch of one optimizer step. Each step is split into
`accum_steps` micro-batches of `batch_size // accum_steps`, each sharded over the mesh's data x fsdp
devices, so per-device micro-batch = batch_size / accum_steps / (data * fsdp).

Weight decay follows the paper's convention: `optimizer.weight_decay` is multiplied by the learning rate
(optax.adamw; flax.optim.Adam in the original code): the paper's 0.03 for ImageNet-21k, 0.1 for JFT-300M.
big_vision's `wd` is multiplied by the schedule only, not by the base learning rate: its `lr=1e-3, wd=1e-4`
is `optimizer.weight_decay = wd / lr = 0.1` here. That conversion is for Adam: with SGD, `weight_decay` is an
L2 term added to the gradient before momentum (optax.add_decayed_weights: classic L2 regularisation), which
momentum 0.9 amplifies about tenfold against big_vision's decoupled decay. The SGD momentum buffer is float32
(the original code and big_vision keep it in bfloat16 to save memory: the same update up to its rounding).
"""

from __future__ import annotations

import ml_collections

from vit_jax.models.variants import parse_variant


def model_config(variant: str) -> ml_collections.ConfigDict:
    """Architecture fields of `variant` ("B/16", "R50+B/16", ...), each overridable on its own."""
    v = parse_variant(variant)
    m = ml_collections.ConfigDict()
    m.variant = variant
    m.hidden_size = v.hidden_size
    m.num_layers = v.num_layers
    m.num_heads = v.num_heads
    m.mlp_dim = v.mlp_dim
    m.patch_size = v.patch_size  # on the image; hybrids: ResNet stride x embedding patch
    # ResNet units per stage for hybrids (empty tuple: plain ViT), and its width multiplier.
    m.resnet_layers = tuple(v.resnet_layers or ())
    m.resnet_width = 1
    m.classifier = "token"  # "token" (class token) or "gap" (global average pool, no class token)
    # 0: no pre-logits layer (big_vision, AugReg); >0: a tanh Dense layer of this size before the head (the
    # paper's ImageNet-21k pre-training used hidden_size; fine-tuning drops it).
    m.representation_size = 0
    m.dropout_rate = 0.1
    m.attention_dropout_rate = 0.0
    m.stochastic_depth = 0.0  # drop-path rate at the last block, linearly increasing from 0
    m.dtype = "float32"  # compute dtype; params stay float32. "bfloat16" on TPU/GPU.
    m.remat = False  # recompute each block's activations in the backward pass
    m.scan = False  # nn.scan over blocks (one compiled block; params stacked as encoderblock/...)
    # Axial-ViT (paper appendix D.3): each block = row attention + MLP, then column attention + MLP over the
    # patch grid (vit_jax/models/axial.py). Needs classifier="gap": axial models have no class token.
    m.axial = False
    # Numerics of the weights' origin: the original checkpoints use tanh-approximate GELU and LN eps 1e-6.
    m.gelu_approximate = True
    m.layernorm_epsilon = 1e-6
    m.head_bias_init = 0.0  # for sigmoid (multi-label) pre-training big_vision's vit_i21k.py uses -10
    return m


def get_config(variant: str = "B/16") -> ml_collections.ConfigDict:
    """The full run config for `variant` with the paper's ImageNet-21k pre-training defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config(variant)

    # Data (see vit_jax/data/datasets.py for the registry of names).
    c.dataset = "imagenet21k"
    c.tfds_data_dir = ""  # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.tfds_manual_dir = ""  # for datasets prepared from manually downloaded archives
    c.train_split = "train"
    c.eval_split = "validation"
    c.num_classes = 21843
    c.label_kind = "single"  # "single": softmax cross-entropy; "multi": multi-hot labels, sigmoid loss
    c.image_size = 224
    c.pp = ml_collections.ConfigDict()
    c.pp.inception_crop = True  # train: random resized crop as TF's sample_distorted_bounding_box; False: resize
    c.pp.crop_min_area = 0.05  # inception crop's smallest area fraction
    # Resizing: False = tf.image.resize's bilinear without antialiasing, as the paper's code and big_vision (the
    # checkpoints they made saw that); True = pillow's antialiased bilinear, from JPEGs decoded at a reduced DCT
    # scale (faster, and no aliasing, on photos many times image_size). predict and visualize follow it too.
    c.pp.antialias = False
    c.pp.flip = True
    # eval: the central fraction of each side, resized to image_size x image_size. Both sides: the aspect ratio is
    # not kept (as the paper's code at 1.0), unlike big_vision's resize_small|central_crop or timm's crop_pct.
    c.pp.eval_crop_fraction = 1.0
    c.pp.mixup_alpha = 0.0
    c.pp.randaugment_layers = 0  # 0: off; AugReg uses 2
    c.pp.randaugment_magnitude = 10.0  # 0..10 is the paper's scale; timm-style fractions (9.5) are fine
    c.pp.random_translate = 0  # train: random shift by up to this many pixels (small images)
    c.data_workers = 0  # grain worker processes per host (0: in the main process)
    c.prefetch_batches = 2
    c.shuffle_seed = 0

    # Batch and schedule.
    c.batch_size = 4096
    c.eval_batch_size = 512
    c.accum_steps = 1
    c.total_steps = 0  # 0: derived from num_epochs
    c.num_epochs = 90
    c.eval_every = 5000  # steps; 0: each tenth of the run (so too checkpoint_every)
    c.log_every = 100
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # "adam" (adamw, pre-training) or "sgd" (momentum, fine-tuning)
    c.optimizer.lr = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.momentum = 0.9
    # Kernels only. adam: decoupled (AdamW), times the scheduled lr; sgd: an L2 term added to the gradient before
    # momentum (coupled: times the lr, and ~1 / (1 - momentum) = 10x more through the momentum), so the same
    # number pulls far harder than adam's: the fine-tuning recipe uses 0.
    c.optimizer.weight_decay = 0.03
    # Global-norm clipping; the paper notes it for ImageNet (Table 3), big_vision's ImageNet-21k configs clip too.
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.schedule = "linear"  # "linear" or "cosine" decay after warmup
    c.optimizer.warmup_steps = 10_000
    c.optimizer.label_smoothing = 0.0
    # Polyak averaging: an exponential moving average of the parameters, evaluated beside them (eval_ema/*) and
    # saved as each checkpoint's "ema" item; 0 = off. The paper's Table 2 fine-tunes used 0.9999.
    c.optimizer.ema_decay = 0.0
    # Fine-tuning controls (vit_jax/optim.py): a regex over parameter paths left untouched, e.g. '(?!head/).*' for a
    # linear probe; and the layer-wise learning-rate decay of BEiT / timm (1.0 = off; 0.65-0.75 is common).
    c.optimizer.freeze = ""
    c.optimizer.layer_decay = 1.0

    # Mesh: sizes of the (data, fsdp, model) axes; -1 means "all remaining devices".
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.model = 1

    # Training objective: "classification" (labels) or "masked_patch_prediction" (the paper's self-supervised
    # pre-training, vit_jax/masked_patch.py: labels unused; fine-tune afterwards with "classification").
    c.objective = "classification"
    c.masked_patch = ml_collections.ConfigDict()
    c.masked_patch.corrupt_fraction = 0.5  # of each image's patches, corrupted and predicted
    c.masked_patch.mask_fraction = 0.8  # of the corrupted: replaced by the learnable mask embedding
    c.masked_patch.random_fraction = 0.1  # of the corrupted: replaced by another patch of the same image
    # (the rest, 0.1, keep their embedding but are still predicted)
    c.masked_patch.colour_bits = 3  # target: mean colour per patch, this many bits per channel (3 -> 512 classes)

    # More test sets scored at every evaluation (vit_jax/extra_evals.py), each "dataset,split" with the model's
    # classes, e.g. ("imagenet2012_real,validation", "imagenet_v2,test") while fine-tuning on imagenet2012.
    c.extra_evals = ()

    # Few-shot linear evaluation of the frozen pre-logits features (vit_jax/fewshot.py; the paper's Section 4.1
    # and big_vision's common_fewshot.py). Datasets: (dataset, train_split, test_split) tuples, or on the command
    # line --config.fewshot.datasets=oxford_iiit_pet,train,test. Empty: off. With datasets, a training run
    # evaluates them at step 0, every `every_steps` (0: not in between) and at the end; --mode=fewshot evaluates
    # a checkpoint.
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.datasets = ()
    c.fewshot.shots = (1, 5, 10, 25)
    c.fewshot.l2_reg = 2.0**10
    c.fewshot.seeds = 3  # draws of the shots per dataset; accuracies are their mean
    c.fewshot.every_steps = 0

    c.pretrained = ""  # path of a checkpoint to start from (.npz, timm/HF, orbax); "" = from scratch
    # Training from `pretrained`: "reset" puts a new zero-initialised head, as the paper and big_vision do;
    # "keep" keeps the checkpoint's head where it has num_classes outputs (e.g. ImageNet-1k weights fine-tuned on
    # ImageNet-1k at a higher resolution). Evaluating a checkpoint (--mode=eval) always keeps its head.
    c.pretrained_head = "reset"
    c.profile_steps = 0  # >0: write a profiler trace of this many steps after the first log
    return c
