"""Pretrained checkpoints in and out: official/big_vision `.npz`, timm, HuggingFace, our orbax checkpoints.

  params = load_pretrained("ViT-B_16.npz", config.model, num_classes=10, image_size=384)
  save_as(params, config.model, "vit_b16_cifar10.safetensors", "timm")

Loading also sets the model config's numerics (GELU flavour, LayerNorm eps) to the weights' origin;
`apply_source_numerics(path, model_config)` does only that (for a run resumed from its own checkpoint).
Our own training checkpoints load too (a workdir, its `checkpoints/` or a step directory), including those of
the masked-patch-prediction model, whose pre-training head is dropped for a classifier.

Modules: `npz` (official files), `torch_hub` (timm / HF state dicts), `orbax_io` (our checkpoints),
`surgery` (position-embedding resize, new head, pre-logits), `loading` (the two functions above), `remote`
(gs:// and other URIs: read from a cached local copy, written through a temporary one).
torch is never imported here; only reading a `.bin` / `.pth` imports it (and timm's, a timm hub config.json
that names only its architecture).
"""

from vit_jax.interop import remote
from vit_jax.interop.common import CheckpointError, MissingHeadError, Numerics
from vit_jax.interop.loading import (
    SOURCE_FORMATS,
    TARGET_FORMATS,
    apply_source_numerics,
    check_destination,
    detect_format,
    grid_side,
    load_pretrained,
    read_checkpoint,
    recorded_run_config,
    save_as,
)
from vit_jax.interop.surgery import adapt_to_model, new_head, resize_posemb

__all__ = [
    "SOURCE_FORMATS", "TARGET_FORMATS", "CheckpointError", "MissingHeadError", "Numerics", "adapt_to_model",
    "apply_source_numerics", "check_destination", "detect_format", "grid_side", "load_pretrained", "new_head",
    "read_checkpoint", "recorded_run_config", "remote", "resize_posemb", "save_as",
]
