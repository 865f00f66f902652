"""timm and HuggingFace ViT state dicts <-> canonical flat params, and reading/writing their files.

Files are read through safetensors (no torch needed) or `torch.load(weights_only=True)`; torch is imported
lazily, only for `.bin` / `.pth` files and for a timm hub `config.json` whose `model_args` leave the head count or
activation out (timm, if installed, builds its `architecture` on the meta device to tell them). Writing uses
`safetensors.numpy` (no torch either).

What no tensor shape shows is checked or recorded: the head count (8 heads of width 8 hold the same arrays as
4 of 16) and the numerics (GELU flavour, LayerNorm eps). Our timm and HF exports record both in the safetensors
metadata; an HF `config.json` or a timm hub `config.json` beside the weights says them too.

timm (`VisionTransformer`): `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`, and in timm < 0.6 files (`jx_vit_*_in21k`) `pre_logits.fc` (Linear +
tanh: our `pre_logits`). HF (`ViTForImageClassification`, hub names): `vit.embeddings.*`,
`vit.encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
layernorm_after, intermediate.dense, output.dense}`, `vit.layernorm`, `classifier`; a `ViTModel` has no `vit.`
prefix and may carry `pooler.dense` (Dense + tanh on the class token: our `pre_logits`). transformers 5's
in-memory names (`vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...) are accepted too.

Variants that compute what this model computes are filled in exactly: q/k/v without biases (`qkv_bias=False`)
get zero biases; a timm `pos_embed` without a class-token slot (`no_embed_class=True`: FlexiViT, big_vision ports)
gets a zero slot.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vit_jax.interop.common import (
    POSEMB_KEY,
    TIMM_NUMERICS,
    CheckpointError,
    Flat,
    Numerics,
    num_layers_of,
    with_class_token_slot,
    write_atomically,
)

HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # in an HF model directory
_APPROXIMATE_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def hf_dir_files(path: str, isfile: Callable[[str], bool] = os.path.isfile) -> tuple[str, str]:
    """(weights file, config.json) of an HF model directory; `isfile` probes the file system (`remote` passes
    tf.io.gfile's). Anything else is refused, naming what a checkpoint directory may be."""
    config_path = os.path.join(path, "config.json")
    for name in HF_WEIGHT_NAMES:
        weights = os.path.join(path, name)
        if isfile(weights) and isfile(config_path):
            return weights, config_path
    raise CheckpointError(f"{path}: a directory that is neither an orbax checkpoint (params/, step dirs, "
                          f"checkpoints/) nor an HF model (config.json + one of {HF_WEIGHT_NAMES})")


# ----------------------------------------------------------------------------------------------- files


def _header_length(path: str) -> int | None:
    """The header length a file that starts like a safetensors file (a u64 header length, then a JSON object's
    "{") declares; None for a file that does not."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    return struct.unpack("<Q", head[:8])[0]


def is_safetensors(path: str) -> bool:
    """True when the file starts like a safetensors file and its header fits in it."""
    header_len = _header_length(path)
    return header_len is not None and 0 < header_len <= os.path.getsize(path) - 8


def truncated_safetensors(path: str) -> str | None:
    """Why a file that starts like a safetensors file (a u64 header length, then "{") cannot be one: its header
    runs past its end (a cut-short download or copy); None otherwise."""
    header_len, size = _header_length(path), os.path.getsize(path)
    if header_len is not None and header_len > size - 8:
        return f"truncated safetensors file: its header alone is {header_len} bytes, the whole file {size}"
    return None


def read_state_dict(path: str) -> Flat:
    """A safetensors / torch file's tensors as float32 numpy arrays; any failure names the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if is_safetensors(path):
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return _unwrap(state, path)


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    # numpy has no bfloat16: read through torch.
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f"{path}: holds bfloat16 tensors; reading them needs torch (pip install "
                              "'vit_jax[torch]')") from e
    try:
        return {k: v.float().numpy() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: is not safetensors; reading a torch .bin/.pth needs torch "
                              "(pip install 'vit_jax[torch]')") from e
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_unpickling_refusal(path, str(e))) from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable torch weights file (torch.load with weights_only=True: "
                              f"{_first_line(str(e), type(e).__name__)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(message: str, default: str) -> str:
    """The first non-empty line of an exception message, without terminal colour codes."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", message).splitlines() if line.strip()]
    return lines[0] if lines else default


def _unpickling_refusal(path: str, message: str) -> str:
    """Why `torch.load(weights_only=True)` refused `path`: torch's "Unsupported global: ..." line (the Python
    object the file pickles) rather than its generic first line, and how to get a file of weights only. A timm
    training checkpoint (`model_best.pth.tar`) pickles its `argparse.Namespace` args, which are never unpickled
    here: unpickling runs code."""
    message = _ANSI_ESCAPE.sub("", message)
    found = re.search(r"Unsupported global: .*?(?:by default\.|$)", message, re.MULTILINE)
    reason = found.group(0) if found else _first_line(message, "UnpicklingError")
    return (f"{path}: not a readable torch weights file (torch.load with weights_only=True refuses it: {reason}); "
            "a training checkpoint that pickles Python objects (e.g. its argparse args) is not unpickled: save "
            "only its state_dict (timm's clean_checkpoint.py --checkpoint <file> --output <new>.pth) or convert "
            "it to .safetensors")


def _unwrap(state: dict[str, Any], path: str) -> Flat:
    """Unwrap training checkpoints ({"state_dict": ...}, {"model": ...}) and DDP's `module.` prefix."""
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    flat: Flat = {}
    for name, value in state.items():
        if not hasattr(value, "shape"):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().float().numpy()
        flat[name.removeprefix("module.")] = np.asarray(value, np.float32)
    if not flat:
        raise CheckpointError(f"{path}: holds no tensors")
    return flat


def read_keys(path: str) -> list[str]:
    """The tensor names of a weights file, as `read_state_dict` would name them. A safetensors file's come from its
    header alone (no tensor is read); a torch `.bin` / `.pth` has no index, so it is read whole."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if not is_safetensors(path):
        return list(read_state_dict(path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            keys = [k.removeprefix("module.") for k in f.keys()]
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors")
    return keys


def flavour_of(state: Iterable[str], path: str) -> str:
    """'timm' or 'hf', told apart by the key names (of a state dict, or `read_keys`)."""
    keys = list(state)
    if any(k.startswith(("patch_embed.", "blocks.")) or k in ("cls_token", "pos_embed") for k in keys):
        return "timm"
    if any(k.startswith(("vit.", "embeddings.", "encoder.layer.")) or k.startswith("classifier.") for k in keys):
        return "hf"
    raise CheckpointError(f"{path}: neither a timm nor a HuggingFace ViT state dict (first keys: "
                          f"{', '.join(sorted(keys)[:5])})")


NUMERICS_METADATA = ("vit_jax.gelu_approximate", "vit_jax.layernorm_epsilon")
HEADS_METADATA = "vit_jax.num_heads"
_HEADS_ADVICE = "pick the matching --config / model.num_heads"


def numerics_metadata(gelu_approximate: bool, layernorm_epsilon: float) -> dict[str, str]:
    """safetensors metadata recording the numerics of exported weights (timm files have no config of their own)."""
    return {"format": "pt", NUMERICS_METADATA[0]: str(bool(gelu_approximate)).lower(),
            NUMERICS_METADATA[1]: repr(float(layernorm_epsilon))}


def export_metadata(model_config: ml_collections.ConfigDict) -> dict[str, str]:
    """safetensors metadata of our timm and HF exports: the numerics (a timm file has no config of its own, a
    copied HF model.safetensors may lose its config.json) and the head count, which no tensor shape shows (8
    heads of width 8 hold the same arrays as 4 of width 16)."""
    return {**numerics_metadata(model_config.gelu_approximate, model_config.layernorm_epsilon),
            HEADS_METADATA: str(int(model_config.num_heads))}


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a safetensors file's header ({} for a torch file, which has none); no tensor is read."""
    if not is_safetensors(path):
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e


def recorded_numerics(path: str) -> Numerics | None:
    """The numerics `numerics_metadata` recorded in a safetensors file of ours, else None."""
    metadata = read_metadata(path)
    if not all(key in metadata for key in NUMERICS_METADATA):
        return None
    try:
        approximate = {"true": True, "false": False}[metadata[NUMERICS_METADATA[0]]]
        eps = float(metadata[NUMERICS_METADATA[1]])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: bad numerics metadata {metadata}") from e
    return Numerics(approximate, eps, f"{path} metadata (gelu_approximate={approximate}, layernorm_epsilon={eps:g})")


def recorded_num_heads(path: str) -> int | None:
    """The head count `export_metadata` recorded in a safetensors file of ours, else None."""
    value = read_metadata(path).get(HEADS_METADATA)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise CheckpointError(f"{path}: bad metadata {HEADS_METADATA}={value!r} (expected an integer)") from e


def _check_num_heads(num_heads: int, found: list[tuple[int, str]], path: str) -> None:
    """Refuse a head count that a file's metadata or config contradicts (`found`: (heads, who says so)); log
    when nothing says it: a wrong count loads without error but computes other logits."""
    for heads, origin in found:
        if heads != num_heads:
            raise CheckpointError(f"{origin}={heads} but the model config has num_heads={num_heads}; {_HEADS_ADVICE}")
    if not found:
        logging.info("%s: the attention head count could not be checked (no %s metadata, no config.json giving it); "
                     "assuming the model config's num_heads=%d", path, HEADS_METADATA, num_heads)


def _read_config_json(config_path: str) -> dict[str, Any]:
    """A config.json as a dict; unreadable or not a JSON object: a CheckpointError naming it."""
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: unreadable config.json ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path}: holds a JSON {type(cfg).__name__}, not a config object")
    return cfg


def write_safetensors(state: Flat, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write numpy tensors as safetensors (atomically: a failed write leaves no temp file and `path` unchanged)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ------------------------------------------------------------------------------------ shared reshapes


def _kernel_to_linear(kernel: np.ndarray) -> np.ndarray:
    """(in, ...out) or (...in, out) flax kernel flattened to 2-D -> torch Linear weight (out, in)."""
    return np.ascontiguousarray(kernel.T)


def _require_ndim(value: np.ndarray | None, ndim: int, key: str, expected: str) -> np.ndarray | None:
    """`value` (None passes) when it has `ndim` dimensions; else a CheckpointError naming the key, the shape
    found and the one expected (a malformed tensor would fail in a reshape or transpose, naming neither)."""
    if value is not None and value.ndim != ndim:
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}, expected {expected}")
    return value


def _require_bias(bias: np.ndarray, weight: np.ndarray, key: str) -> np.ndarray:
    """`bias` when it holds one value per output feature of the Linear `weight` (out, in); else a CheckpointError."""
    if bias.shape != weight.shape[:1]:
        raise CheckpointError(f"{key} has shape {tuple(bias.shape)}, expected ({weight.shape[0]},): one value per "
                              "output feature of its weight")
    return bias


def _qkv_from_linear(weight: np.ndarray, bias: np.ndarray, num_heads: int, what: str) -> tuple:
    """torch Linear (heads*head_dim, in) -> flax DenseGeneral kernel (in, heads, head_dim), bias (heads, head_dim).

    `what` names the Linear (`<file>: <prefix>.query`) in errors about its weight's or bias's shape."""
    _require_ndim(weight, 2, f"{what}.weight", "2-D (out_features, in_features)")
    _require_bias(bias, weight, f"{what}.bias")
    out_features, in_features = weight.shape
    if out_features % num_heads:
        raise CheckpointError(f"{what}: {out_features} output features do not split into num_heads={num_heads}")
    head_dim = out_features // num_heads
    return weight.T.reshape(in_features, num_heads, head_dim), bias.reshape(num_heads, head_dim)


def _out_from_linear(weight: np.ndarray, num_heads: int, what: str) -> np.ndarray:
    """torch Linear (out, heads*head_dim) -> flax out kernel (heads, head_dim, out); `what` names the Linear."""
    _require_ndim(weight, 2, f"{what}.weight", "2-D (out_features, in_features)")
    out_features, in_features = weight.shape
    if in_features % num_heads:
        raise CheckpointError(f"{what}: {in_features} input features do not split into num_heads={num_heads}")
    return weight.T.reshape(num_heads, in_features // num_heads, out_features)


def _zero_bias_if_none(bias: np.ndarray | None, weight: np.ndarray) -> np.ndarray:
    """The bias of a torch Linear, or zeros when it has none (timm / HF `qkv_bias=False`: computes the same)."""
    return np.zeros(weight.shape[0], weight.dtype) if bias is None else bias


def _patch_kernel(weight: np.ndarray | None, key: str) -> np.ndarray | None:
    """torch Conv2d weight (hidden, channels, p, p) -> flax Conv kernel (p, p, channels, hidden)."""
    _require_ndim(weight, 4, key, "4-D (hidden, channels, patch, patch): the patch embedding's Conv2d")
    return None if weight is None else weight.transpose(2, 3, 1, 0)


def _split_qkv(weight: np.ndarray, bias: np.ndarray | None, key: str) -> tuple[list, list]:
    """timm's fused qkv Linear (3*hidden, in) -> ([q, k, v] weights, [q, k, v] biases; zeros without a bias)."""
    _require_ndim(weight, 2, f"{key}.weight", "2-D (3*hidden, hidden)")
    if weight.shape[0] % 3:
        raise CheckpointError(f"{key}.weight has shape {tuple(weight.shape)}, expected (3*hidden, hidden): its "
                              f"{weight.shape[0]} rows do not split into query, key and value")
    bias = _require_bias(_zero_bias_if_none(bias, weight), weight, f"{key}.bias")
    return np.split(weight, 3), np.split(bias, 3)


def _refuse_extra_tokens(state: Flat, path: str) -> None:
    """Refuse, by name, timm models whose extra tokens this model lacks: DeiT's distillation token (and head)
    and register tokens. Their position embeddings would otherwise be refused as 'not a square patch grid'."""
    if "dist_token" in state or any(k.startswith("head_dist.") for k in state):
        raise CheckpointError(f"{path}: a distilled DeiT (dist_token, head_dist): this model has one class token "
                              "and one head, no distillation token; load a non-distilled DeiT (deit_*, not "
                              "deit_*_distilled_*)")
    registers = state.get("reg_token")
    if registers is not None:
        count = f"{registers.shape[1]} " if registers.ndim == 3 else ""
        raise CheckpointError(f"{path}: a timm model with {count}register tokens (reg_token "
                              f"{tuple(registers.shape)}): this model has no register tokens")


def _take(state: Flat, name: str, taken: set[str]) -> np.ndarray | None:
    if name in state:
        taken.add(name)
        return state[name]
    return None


def _block_indices(state: Flat, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _leftovers(state: Flat, taken: set[str]) -> Flat:
    """Keys no rule consumed, kept under their own (dotted) names so the shape check lists them as unexpected."""
    return {k: v for k, v in state.items() if k not in taken}


# ----------------------------------------------------------------------------------------------- timm


def _timm_config(config_path: str | None) -> dict[str, Any] | None:
    """The timm hub config.json at `config_path` as a dict; None without one, for an unreadable one (timm_numerics,
    which reads it too, logs why) or one that is not timm's (no `architecture`, or an HF `model_type`)."""
    try:
        cfg = _read_config_json(config_path) if config_path else {}
    except CheckpointError:
        return None
    return cfg if "architecture" in cfg and "model_type" not in cfg else None


def _timm_posemb_has_slot(state: Flat, config_path: str | None) -> bool | None:
    """Whether timm's `pos_embed` holds the class token's entry, as the timm config.json beside the weights says:
    its `model_args.no_embed_class`, else the patch count of its image size (`model_args.img_size`, else
    `pretrained_cfg.input_size`) and patch size (`model_args.patch_size`, else the patch kernel's) against the
    count. None when it does not tell (no config.json, or one whose sizes fit neither reading)."""
    cfg = _timm_config(config_path)
    if cfg is None:
        return None
    args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    if isinstance(args.get("no_embed_class"), bool):
        return not args["no_embed_class"]
    pretrained = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    input_size = pretrained.get("input_size")  # (channels, height, width)
    image = _pair(args.get("img_size", input_size[1:] if isinstance(input_size, list) else None))
    kernel = state.get("patch_embed.proj.weight")
    patch = _pair(args.get("patch_size", kernel.shape[-2:] if kernel is not None and kernel.ndim == 4 else None))
    if image is None or patch is None or 0 in patch:
        return None
    patches, tokens = (image[0] // patch[0]) * (image[1] // patch[1]), state["pos_embed"].shape[1]
    return tokens == patches + 1 if tokens in (patches, patches + 1) else None


def _pair(value: Any) -> tuple[int, int] | None:
    """An (h, w) size from timm's int or 2-sequence form; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


_TIMM_PATCH_POOLS = ("avg", "max", "avgmax")  # timm's global_pool of the patch tokens, the class token left out


def _timm_global_pool(config_path: str | None) -> str | None:
    """A timm config.json's `model_args.global_pool`, else that of the model timm builds for its `architecture`
    (only when timm is installed); None when it does not say."""
    cfg = _timm_config(config_path)
    if cfg is None:
        return None
    args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    if isinstance(args.get("global_pool"), str):
        return args["global_pool"]
    return _timm_architecture_facts(str(cfg["architecture"])).get("global_pool")


def timm_to_canonical(state: Flat, num_heads: int, path: str, config_path: str | None = None) -> Flat:
    """timm VisionTransformer state dict -> canonical flat params (unknown keys passed through as unexpected);
    `config_path`, a timm config.json beside the weights, tells whether `pos_embed` has a class-token slot."""
    if any(k.startswith("patch_embed.backbone.") for k in state):
        raise CheckpointError(f"{path}: a timm hybrid (ResNetV2 backbone with timm's own GroupNorm/StdConv eps); "
                              "load the official hybrid .npz instead")
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise CheckpointError(f"{path}: timm model with fc_norm (LayerNorm after pooling); this model normalises "
                              "before pooling (timm: fc_norm=False)")
    _refuse_extra_tokens(state, path)
    # Only a class-token model can be read as the wrong one (the lookup may build timm's model for the name).
    if "cls_token" in state and (pool := _timm_global_pool(config_path)) in _TIMM_PATCH_POOLS:
        raise CheckpointError(f"{path}: a timm model with a class token whose head reads the patches pooled "
                              f"(global_pool={pool!r}, as {config_path} says), not the class token; this model "
                              "classifies the class token, or the patches' mean without one (timm "
                              "class_token=False, global_pool='avg')")
    taken: set[str] = set()
    flat: Flat = {}

    def put(dst: str, value: np.ndarray | None) -> None:
        if value is not None:
            flat[dst] = value

    put("embedding/kernel", _patch_kernel(_take(state, "patch_embed.proj.weight", taken),
                                          f"{path}: patch_embed.proj.weight"))
    put("embedding/bias", _take(state, "patch_embed.proj.bias", taken))
    put("cls", _take(state, "cls_token", taken))
    pos_embed = _take(state, "pos_embed", taken)
    if pos_embed is not None:
        has_slot = _timm_posemb_has_slot(state, config_path) if pos_embed.ndim == 3 and "cls" in flat else None
        flat[POSEMB_KEY] = with_class_token_slot(pos_embed, "cls" in flat, has_slot, source=path)
    for i in _block_indices(state, r"blocks\.(\d+)\."):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            put(f"{dst}{ln}/scale", _take(state, f"{src}{norm}.weight", taken))
            put(f"{dst}{ln}/bias", _take(state, f"{src}{norm}.bias", taken))
        qkv_w, qkv_b = _take(state, f"{src}attn.qkv.weight", taken), _take(state, f"{src}attn.qkv.bias", taken)
        if qkv_w is not None:
            attn = f"{dst}MultiHeadDotProductAttention_1/"
            weights, biases = _split_qkv(qkv_w, qkv_b, f"{path}: {src}attn.qkv")
            for name, w_part, b_part in zip(("query", "key", "value"), weights, biases):
                kernel, bias = _qkv_from_linear(w_part, b_part, num_heads, f"{path}: {src}attn.qkv")
                flat[f"{attn}{name}/kernel"], flat[f"{attn}{name}/bias"] = kernel, bias
        proj = _take(state, f"{src}attn.proj.weight", taken)
        if proj is not None:
            flat[f"{dst}MultiHeadDotProductAttention_1/out/kernel"] = _out_from_linear(proj, num_heads,
                                                                                      f"{path}: {src}attn.proj")
        put(f"{dst}MultiHeadDotProductAttention_1/out/bias", _take(state, f"{src}attn.proj.bias", taken))
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            w = _take(state, f"{src}mlp.{fc}.weight", taken)
            put(f"{dst}MlpBlock_3/{dense}/kernel", None if w is None else w.T)
            put(f"{dst}MlpBlock_3/{dense}/bias", _take(state, f"{src}mlp.{fc}.bias", taken))
    put("Transformer/encoder_norm/scale", _take(state, "norm.weight", taken))
    put("Transformer/encoder_norm/bias", _take(state, "norm.bias", taken))
    # timm < 0.6's representation layer (Linear then Tanh, released in jx_vit_*_in21k files): our pre_logits.
    w = _take(state, "pre_logits.fc.weight", taken)
    put("pre_logits/kernel", None if w is None else w.T)
    put("pre_logits/bias", _take(state, "pre_logits.fc.bias", taken))
    w = _take(state, "head.weight", taken)
    put("head/kernel", None if w is None else w.T)
    put("head/bias", _take(state, "head.bias", taken))
    return {**flat, **_leftovers(state, taken)}


def canonical_to_timm(flat: Flat) -> Flat:
    """Canonical flat params of a plain ViT (no pre-logits) -> timm VisionTransformer state dict."""
    state: Flat = {
        "patch_embed.proj.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["embedding/bias"],
        "pos_embed": flat[POSEMB_KEY],
        "norm.weight": flat["Transformer/encoder_norm/scale"],
        "norm.bias": flat["Transformer/encoder_norm/bias"],
    }
    if "cls" in flat:
        state["cls_token"] = flat["cls"]
    for i in range(num_layers_of(flat)):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = f"{src}MultiHeadDotProductAttention_1/"
        state[f"{dst}norm1.weight"] = flat[f"{src}LayerNorm_0/scale"]
        state[f"{dst}norm1.bias"] = flat[f"{src}LayerNorm_0/bias"]
        state[f"{dst}attn.qkv.weight"] = np.concatenate(
            [_kernel_to_linear(flat[f"{attn}{n}/kernel"].reshape(flat[f"{attn}{n}/kernel"].shape[0], -1))
             for n in ("query", "key", "value")])
        state[f"{dst}attn.qkv.bias"] = np.concatenate([flat[f"{attn}{n}/bias"].reshape(-1)
                                                       for n in ("query", "key", "value")])
        out = flat[f"{attn}out/kernel"]
        state[f"{dst}attn.proj.weight"] = _kernel_to_linear(out.reshape(-1, out.shape[-1]))
        state[f"{dst}attn.proj.bias"] = flat[f"{attn}out/bias"]
        state[f"{dst}norm2.weight"] = flat[f"{src}LayerNorm_2/scale"]
        state[f"{dst}norm2.bias"] = flat[f"{src}LayerNorm_2/bias"]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            state[f"{dst}mlp.{fc}.weight"] = _kernel_to_linear(flat[f"{src}MlpBlock_3/{dense}/kernel"])
            state[f"{dst}mlp.{fc}.bias"] = flat[f"{src}MlpBlock_3/{dense}/bias"]
    if "head/kernel" in flat:
        state["head.weight"] = _kernel_to_linear(flat["head/kernel"])
        state["head.bias"] = flat["head/bias"]
    return state


# ------------------------------------------------------------------------------------------------- HF

# transformers 5 in-memory names -> the hub (save_pretrained) names used below.
_HF_V5_RENAMES = (
    (r"(^|\.)layers\.(\d+)\.attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query."),
    (r"(^|\.)layers\.(\d+)\.attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key."),
    (r"(^|\.)layers\.(\d+)\.attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value."),
    (r"(^|\.)layers\.(\d+)\.attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layer.\2.output.dense."),
    (r"(^|\.)layers\.(\d+)\.layernorm_", r"\1encoder.layer.\2.layernorm_"),
)


def _hf_hub_names(state: Flat) -> Flat:
    out: Flat = {}
    for name, value in state.items():
        for pattern, replacement in _HF_V5_RENAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    return out


def hf_to_canonical(state: Flat, num_heads: int, path: str) -> Flat:
    """HF ViTForImageClassification / ViTModel state dict -> canonical flat params."""
    state = _hf_hub_names(state)
    if any(k.startswith("vit.") for k in state):
        state = {(k[len("vit."):] if k.startswith("vit.") else k): v for k, v in state.items()}
    taken: set[str] = set()
    flat: Flat = {}

    def put(dst: str, value: np.ndarray | None) -> None:
        if value is not None:
            flat[dst] = value

    def linear(src: str, dst: str) -> None:
        w = _take(state, f"{src}.weight", taken)
        put(f"{dst}/kernel", None if w is None else w.T)
        put(f"{dst}/bias", _take(state, f"{src}.bias", taken))

    def norm(src: str, dst: str) -> None:
        put(f"{dst}/scale", _take(state, f"{src}.weight", taken))
        put(f"{dst}/bias", _take(state, f"{src}.bias", taken))

    put("embedding/kernel", _patch_kernel(_take(state, "embeddings.patch_embeddings.projection.weight", taken),
                                          f"{path}: embeddings.patch_embeddings.projection.weight"))
    put("embedding/bias", _take(state, "embeddings.patch_embeddings.projection.bias", taken))
    put("cls", _take(state, "embeddings.cls_token", taken))
    put(POSEMB_KEY, _take(state, "embeddings.position_embeddings", taken))
    for i in _block_indices(state, r"encoder\.layer\.(\d+)\."):
        src, dst = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
        attn = f"{dst}MultiHeadDotProductAttention_1/"
        norm(f"{src}layernorm_before", f"{dst}LayerNorm_0")
        for name in ("query", "key", "value"):
            w = _take(state, f"{src}attention.attention.{name}.weight", taken)
            b = _take(state, f"{src}attention.attention.{name}.bias", taken)
            if w is not None:
                b = _zero_bias_if_none(b, w)
                kernel, bias = _qkv_from_linear(w, b, num_heads, f"{path}: {src}attention.attention.{name}")
                flat[f"{attn}{name}/kernel"], flat[f"{attn}{name}/bias"] = kernel, bias
        w = _take(state, f"{src}attention.output.dense.weight", taken)
        if w is not None:
            flat[f"{attn}out/kernel"] = _out_from_linear(w, num_heads, f"{path}: {src}attention.output.dense")
        put(f"{attn}out/bias", _take(state, f"{src}attention.output.dense.bias", taken))
        norm(f"{src}layernorm_after", f"{dst}LayerNorm_2")
        linear(f"{src}intermediate.dense", f"{dst}MlpBlock_3/Dense_0")
        linear(f"{src}output.dense", f"{dst}MlpBlock_3/Dense_1")
    norm("layernorm", "Transformer/encoder_norm")
    linear("pooler.dense", "pre_logits")
    linear("classifier", "head")
    return {**flat, **_leftovers(state, taken)}


def canonical_to_hf(flat: Flat) -> Flat:
    """Canonical flat params (class token, no pre-logits) -> ViTForImageClassification state dict (hub names)."""
    state: Flat = {
        "vit.embeddings.cls_token": flat["cls"],
        "vit.embeddings.position_embeddings": flat[POSEMB_KEY],
        "vit.embeddings.patch_embeddings.projection.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
        "vit.layernorm.weight": flat["Transformer/encoder_norm/scale"],
        "vit.layernorm.bias": flat["Transformer/encoder_norm/bias"],
        "classifier.weight": _kernel_to_linear(flat["head/kernel"]),
        "classifier.bias": flat["head/bias"],
    }
    for i in range(num_layers_of(flat)):
        src, dst = f"Transformer/encoderblock_{i}/", f"vit.encoder.layer.{i}."
        attn = f"{src}MultiHeadDotProductAttention_1/"
        state[f"{dst}layernorm_before.weight"] = flat[f"{src}LayerNorm_0/scale"]
        state[f"{dst}layernorm_before.bias"] = flat[f"{src}LayerNorm_0/bias"]
        for name in ("query", "key", "value"):
            kernel = flat[f"{attn}{name}/kernel"]
            state[f"{dst}attention.attention.{name}.weight"] = _kernel_to_linear(kernel.reshape(kernel.shape[0], -1))
            state[f"{dst}attention.attention.{name}.bias"] = flat[f"{attn}{name}/bias"].reshape(-1)
        out = flat[f"{attn}out/kernel"]
        state[f"{dst}attention.output.dense.weight"] = _kernel_to_linear(out.reshape(-1, out.shape[-1]))
        state[f"{dst}attention.output.dense.bias"] = flat[f"{attn}out/bias"]
        state[f"{dst}layernorm_after.weight"] = flat[f"{src}LayerNorm_2/scale"]
        state[f"{dst}layernorm_after.bias"] = flat[f"{src}LayerNorm_2/bias"]
        for name, dense in (("intermediate", "Dense_0"), ("output", "Dense_1")):
            state[f"{dst}{name}.dense.weight"] = _kernel_to_linear(flat[f"{src}MlpBlock_3/{dense}/kernel"])
            state[f"{dst}{name}.dense.bias"] = flat[f"{src}MlpBlock_3/{dense}/bias"]
    return state


def hf_config(model_config: ml_collections.ConfigDict, num_classes: int, image_size: int,
              label_kind: str = "single") -> dict[str, Any]:
    """The `config.json` of a ViTForImageClassification with our numerics (GELU flavour, LayerNorm eps); a model
    trained with `label_kind="multi"` (a sigmoid per class) says `problem_type` "multi_label_classification", else
    HF's pipeline would read its logits through a softmax."""
    m = model_config
    problem = {"problem_type": "multi_label_classification"} if label_kind == "multi" else {}
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.mlp_dim,
        "hidden_act": "gelu_pytorch_tanh" if m.gelu_approximate else "gelu",
        "layer_norm_eps": float(m.layernorm_epsilon),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "image_size": image_size,
        "patch_size": m.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "encoder_stride": m.patch_size,
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(num_classes)},
        **problem,
        "dtype": "float32",
    }


PREPROCESSOR_JSON = "preprocessor_config.json"  # an HF image processor's settings, beside config.json


def hf_preprocessor_config(image_size: int) -> dict[str, Any]:
    """The `preprocessor_config.json` of our input: the whole image resized bilinearly to `image_size` square, then
    [0, 255] -> [-1, 1] (mean = std = 0.5), as our evaluation with `eval_crop_fraction` 1. Without one HF's
    `pipeline("image-classification")` refuses the directory, and HF's default processor resizes to 224."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


@dataclasses.dataclass(frozen=True)
class InputTransform:
    """What a source model took as its input, per channel, as `scale * u + shift` of our input u in [-1, 1]
    (`x / 127.5 - 1` of the 0..255 pixels x); `origin` says who says so."""

    scale: np.ndarray  # (3,)
    shift: np.ndarray  # (3,)
    origin: str

    def is_identity(self) -> bool:
        return bool(np.allclose(self.scale, 1.0, rtol=0, atol=1e-6) and np.allclose(self.shift, 0.0, atol=1e-6))


def input_transform(config_path: str | None, flavour: str) -> InputTransform | None:
    """The input normalisation timm or HF weights were trained with, from what lies beside them: a timm hub
    `config.json`'s `pretrained_cfg.mean` / `.std` (on pixels / 255), or an HF directory's
    `preprocessor_config.json` (`do_rescale` / `rescale_factor`, `do_normalize` / `image_mean` / `image_std`).
    None when nothing says (then the weights are taken to expect [-1, 1], as ours). DeiT, DINO and MAE weights
    expect ImageNet's mean and std, not [-1, 1]; a value that cannot be a normalisation is a CheckpointError."""
    if config_path is None:
        return None
    if flavour == "timm":
        cfg = _timm_config(config_path)
        if cfg is None:
            return None
        pretrained = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
        if "mean" not in pretrained and "std" not in pretrained:
            return None
        where = f"{config_path}: pretrained_cfg"
        mean = _channel_values(pretrained.get("mean", 0.5), f"{where}.mean")
        std = _channel_values(pretrained.get("std", 0.5), f"{where}.std", positive=True)
        rescale = 1 / 255
        origin = f"timm config.json (mean {_shown(mean)}, std {_shown(std)})"
    else:
        path = os.path.join(os.path.dirname(config_path), PREPROCESSOR_JSON)
        if not os.path.isfile(path):
            return None
        cfg = _read_config_json(path)
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 < rescale < float("inf"):
            raise CheckpointError(f"{path}: rescale_factor={rescale!r} is invalid: expected a positive number "
                                  "(1/255 takes pixels to [0, 1])")
        if cfg.get("do_normalize", True):
            mean = _channel_values(cfg.get("image_mean", 0.5), f"{path}: image_mean")
            std = _channel_values(cfg.get("image_std", 0.5), f"{path}: image_std", positive=True)
        else:
            mean, std = np.zeros(3), np.ones(3)
        pixels = "pixels / 255" if abs(rescale - 1 / 255) < 1e-12 else f"pixels x {rescale:g}"
        origin = f"{PREPROCESSOR_JSON} ({pixels}, mean {_shown(mean)}, std {_shown(std)})"
    # (x * rescale - mean) / std with x = 127.5 * (u + 1):
    return InputTransform(127.5 * rescale / std, (127.5 * rescale - mean) / std, origin)


def _channel_values(value: Any, where: str, positive: bool = False) -> np.ndarray:
    """Three per-channel floats from a number or a 3-sequence; anything else a CheckpointError naming `where`."""
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = (isinstance(values, (list, tuple)) and len(values) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))
    array = np.asarray(values, np.float64) if ok else None
    if array is None or not np.all(np.isfinite(array)) or (positive and not np.all(array > 0)):
        raise CheckpointError(f"{where}={value!r} is invalid: expected {'a positive' if positive else 'a'} number "
                              "or 3 of them, one per RGB channel")
    return array


def _shown(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def hf_numerics(config_path: str | None, num_heads: int | None, weights_path: str | None = None) -> Numerics:
    """GELU flavour and LayerNorm eps of HF weights, checking `num_heads` (when given) against what says it.

    From the HF `config.json` (`model_type` 'vit'; one without `model_type` is read as such, with a warning);
    without one, from the numerics our export recorded in `weights_path`, else HF's defaults (exact GELU, eps
    1e-12)."""
    recorded_heads = recorded_num_heads(weights_path) if weights_path else None
    heads = [] if recorded_heads is None else [(recorded_heads, f"{weights_path}: metadata {HEADS_METADATA}")]
    if config_path is None:
        if num_heads is not None:
            _check_num_heads(num_heads, heads, weights_path or "HF weights")
        recorded = recorded_numerics(weights_path) if weights_path else None
        return recorded or Numerics(False, 1e-12, "HF defaults, no config.json beside the weights (exact GELU, "
                                                  "eps 1e-12)")
    cfg = _read_config_json(config_path)
    if "model_type" not in cfg:  # the weights' keys are HF's: read it as the ViT config it goes with
        logging.warning("%s: has no model_type; read as an HF ViT config (model_type 'vit') since the weights beside "
                        "it are HF's", config_path)
    elif cfg["model_type"] != "vit":
        raise CheckpointError(f"{config_path}: model_type {cfg['model_type']!r} is not 'vit'")
    if num_heads is not None:
        if "num_attention_heads" in cfg:
            heads.insert(0, (cfg["num_attention_heads"], f"{config_path}: num_attention_heads"))
        _check_num_heads(num_heads, heads, weights_path or config_path)
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu",) + _APPROXIMATE_GELUS:
        raise CheckpointError(f"{config_path}: hidden_act={act!r} is not supported; valid: "
                              f"{['gelu', *_APPROXIMATE_GELUS]}")
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    return Numerics(act in _APPROXIMATE_GELUS, eps, f"HF config.json (hidden_act={act}, layer_norm_eps={eps:g})")


# --------------------------------------------------------------------------------------- timm numerics

_TIMM_GELUS = {"gelu": False, "gelu_tanh": True}  # timm act_layer names of what this model computes


def timm_numerics(weights_path: str, config_path: str | None, num_heads: int | None) -> Numerics:
    """GELU flavour and LayerNorm eps of timm weights, checking `num_heads` (when given) against what says it.

    From the numerics our export recorded in the file; else from a timm `config.json` beside it (a hub
    download's: its `model_args`, or what timm builds for its `architecture`); else timm's defaults (exact GELU,
    eps 1e-6; logged, since e.g. timm's SigLIP-GAP models use tanh GELU)."""
    recorded, recorded_heads = recorded_numerics(weights_path), recorded_num_heads(weights_path)
    heads = [] if recorded_heads is None else [(recorded_heads, f"{weights_path}: metadata {HEADS_METADATA}")]
    facts: dict[str, Any] = {}
    if config_path is not None and (recorded is None or (num_heads is not None and not heads)):
        facts = timm_config_facts(config_path)
    if num_heads is not None:
        if not heads and "num_heads" in facts:
            heads.append((facts["num_heads"], facts["heads_origin"]))
        _check_num_heads(num_heads, heads, weights_path)
    if recorded is not None:
        return recorded
    if "act_layer" in facts:
        return _numerics_of_timm_facts(facts, config_path)
    # Louder where a config.json names the model but could not be looked up (timm not installed, or a name it does
    # not know): the numerics would then depend on what is installed.
    log = logging.warning if config_path is not None and facts == {} else logging.info
    log("%s: no numerics recorded and no timm config.json beside it giving the activation: assuming timm's default "
        "exact GELU and LayerNorm eps 1e-6 (a tanh-GELU model, e.g. SigLIP, computes slightly differently; with "
        "timm installed its architecture is looked up, or add model_args.act_layer to the config.json)", weights_path)
    return TIMM_NUMERICS


def _numerics_of_timm_facts(facts: dict[str, Any], config_path: str) -> Numerics:
    """Numerics from `timm_config_facts`; an activation this model does not compute is refused."""
    act = facts["act_layer"]
    if act not in _TIMM_GELUS:
        raise CheckpointError(f"{config_path}: {facts['act_origin']} act_layer={act!r} is not supported; valid: "
                              f"{sorted(_TIMM_GELUS)}")
    eps = float(facts.get("layernorm_epsilon", TIMM_NUMERICS.layernorm_epsilon))
    return Numerics(_TIMM_GELUS[act], eps, f"timm config.json {config_path} ({facts['act_origin']} act_layer={act}, "
                                           f"LayerNorm eps {eps:g})")


def timm_config_facts(config_path: str) -> dict[str, Any]:
    """What a timm hub `config.json` says of the weights beside it: `num_heads`, `act_layer` ('gelu', 'gelu_tanh'
    or another activation's name), `layernorm_epsilon`, each with who says it ({} for a config.json that is not
    timm's). Its `model_args` come first; what they leave out comes from the model timm builds for its
    `architecture` (on the meta device: no memory, no download; only when timm is installed)."""
    try:
        cfg = _read_config_json(config_path)
    except CheckpointError as e:  # the weights do not need it: read them as if it were not there
        logging.warning("%s; not used for the timm weights beside it", e)
        return {}
    if "architecture" not in cfg or "model_type" in cfg:
        logging.info("%s: not a timm config.json (no 'architecture'); not used for the timm weights beside it",
                     config_path)
        return {}
    architecture = str(cfg["architecture"])
    args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    facts: dict[str, Any] = {}
    if "num_heads" not in args or "act_layer" not in args:
        built = _timm_architecture_facts(architecture)
        if built:
            facts.update(built, heads_origin=f"{config_path}: timm architecture {architecture!r} num_heads",
                         act_origin=f"architecture {architecture!r}")
    if isinstance(args.get("num_heads"), int):
        facts.update(num_heads=args["num_heads"], heads_origin=f"{config_path}: model_args num_heads")
    if "act_layer" in args and (args["act_layer"] is None or isinstance(args["act_layer"], str)):
        facts.update(act_layer=args["act_layer"] or "gelu", act_origin="model_args")  # None: timm's default
    return facts


@functools.lru_cache(maxsize=8)
def _timm_architecture_facts(architecture: str) -> dict[str, Any]:
    """num_heads, act_layer, LayerNorm eps and global_pool of the VisionTransformer timm builds for `architecture`,
    built on torch's meta device; {} (logged) when timm is not installed or does not build a ViT by that name."""
    try:
        import timm
        import torch
    except ImportError:
        logging.info("timm is not installed: the architecture %r of a timm config.json is not looked up",
                     architecture)
        return {}
    if not timm.is_model(architecture):  # also keeps `hf-hub:` names (downloads) out
        logging.info("timm %s has no model %r: its head count and activation are not looked up", timm.__version__,
                     architecture)
        return {}
    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False)
        block = model.blocks[0]
        act, eps, heads = block.mlp.act, float(block.norm1.eps), int(block.attn.num_heads)
        pool = str(model.global_pool)
    except Exception as e:  # noqa: BLE001 - any model timm cannot build, or one that is not a plain ViT
        logging.info("timm model %r: head count and activation not looked up (%s: %s)", architecture,
                     type(e).__name__, e)
        return {}
    return {"num_heads": heads, "act_layer": _timm_act_name(act), "layernorm_epsilon": eps, "global_pool": pool}


def _timm_act_name(act: Any) -> str:
    """'gelu' / 'gelu_tanh' for timm's GELU modules, the class name for any other activation."""
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return "gelu_tanh" if name == "GELUTanh" else name
