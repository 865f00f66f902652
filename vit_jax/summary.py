"""`python -m vit_jax.summary --config=configs/vit_b16.py [--config.x=y] [--json]`: size and cost of a model.

Prints the parameter count, forward GFLOPs per image counted analytically (multiply-adds x 2 of every
matmul and convolution) and cross-checked against XLA's cost analysis of the lowered forward pass, and a
per-layer table. Axial-ViT (`--config.model.axial=True`) is counted block by block: two dense halves per
block, attention within rows and columns only. Shapes come from `jax.eval_shape`, so nothing is allocated:
ViT-H/14 takes seconds. A config with `objective='masked_patch_prediction'` is counted as the model it
pre-trains: its per-patch colour head in place of the classifier's head.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from vit_jax import cli, config_check, masked_patch
from vit_jax.models import axial
from vit_jax.models.variants import embedding_patch


@dataclasses.dataclass
class LayerRow:
    """One line of the per-layer table."""

    name: str
    params: int
    flops: float  # forward FLOPs per image


def param_shapes(config: ml_collections.ConfigDict) -> dict:
    """The parameter tree of the model the config trains, as ShapeDtypeStructs (nothing allocated)."""
    model = masked_patch.make_model(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return nn.unbox(variables["params"])


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _conv_flops(out_hw: int, kernel: int, c_in: int, c_out: int) -> float:
    return 2.0 * out_hw * out_hw * kernel * kernel * c_in * c_out


def _resnet_rows(params: dict, layers: Sequence[int], image_size: int) -> list[LayerRow]:
    """FLOPs of the BiT trunk, stage by stage (GroupNorm and ReLU are not counted)."""
    width = params["conv_root"]["kernel"].shape[-1]
    hw = image_size // 2
    stem_flops = _conv_flops(hw, 7, 3, width)
    rows = [LayerRow("conv_root+gn_root", _count({k: params[k] for k in ("conv_root", "gn_root")}), stem_flops)]
    hw //= 2  # max-pool
    c_in = width
    for s, num_units in enumerate(layers):
        features = width * 2**s
        flops = 0.0
        for u in range(num_units):
            stride = 2 if (s > 0 and u == 0) else 1
            out_hw = hw // stride
            flops += _conv_flops(hw, 1, c_in, features)  # conv1 at the input resolution
            flops += _conv_flops(out_hw, 3, features, features)  # conv2 carries the stride
            flops += _conv_flops(out_hw, 1, features, features * 4)  # conv3
            if c_in != features * 4 or stride != 1:
                flops += _conv_flops(out_hw, 1, c_in, features * 4)  # conv_proj
            hw, c_in = out_hw, features * 4
        rows.append(LayerRow(f"block{s + 1} ({num_units} units)", _count(params[f"block{s + 1}"]), flops))
    return rows


def _unscanned(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same model with its blocks unrolled: equal params and FLOPs, per-block shapes, and XLA counts every
    block (it counts a scan body once)."""
    if not config.model.scan:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.scan = False
    return config


def layer_table(config: ml_collections.ConfigDict) -> list[LayerRow]:
    """Per-layer parameters and analytic forward FLOPs per image (scanned models counted as unrolled)."""
    config = _unscanned(config)
    m = config.model
    params = param_shapes(config)
    rows: list[LayerRow] = []
    grid = config.image_size // m.patch_size
    if m.resnet_layers:
        rows += _resnet_rows(params, tuple(m.resnet_layers), config.image_size)
        c_in = params["embedding"]["kernel"].shape[2]
    else:
        c_in = 3
    embed_patch = embedding_patch(m.patch_size, tuple(m.resnet_layers))
    rows.append(LayerRow("embedding", _count(params["embedding"]),
                         _conv_flops(grid, embed_patch, c_in, m.hidden_size)))
    tokens = grid * grid + (1 if m.classifier == "token" else 0)
    if "mask_embedding" in params:
        rows.append(LayerRow("mask_embedding", _count(params["mask_embedding"]), 0.0))
    if "cls" in params:
        rows.append(LayerRow("cls", _count(params["cls"]), 0.0))
    transformer = params["Transformer"]
    rows.append(LayerRow("Transformer/posembed_input", _count(transformer["posembed_input"]), 0.0))
    d, mlp = m.hidden_size, m.mlp_dim
    if m.axial:
        block_flops = axial.block_flops((grid, grid), d, mlp)
    else:
        block_flops = 2.0 * (4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * mlp)
    for i in range(m.num_layers):
        block = (jax.tree.map(lambda a, i=i: a[i], transformer["encoderblock"]) if m.scan
                 else transformer[f"encoderblock_{i}"])
        rows.append(LayerRow(f"Transformer/encoderblock_{i}", _count(block), block_flops))
    rows.append(LayerRow("Transformer/encoder_norm", _count(transformer["encoder_norm"]), 0.0))
    if "masked_patch_head" in params:  # every patch token predicts its colour; no pooling, pre_logits or head
        colours = params["masked_patch_head"]["kernel"].shape[-1]
        rows.append(LayerRow("masked_patch_head", _count(params["masked_patch_head"]),
                             2.0 * grid * grid * d * colours))
        return rows
    head_in = d
    if m.representation_size:
        rows.append(LayerRow("pre_logits", _count(params["pre_logits"]), 2.0 * d * m.representation_size))
        head_in = m.representation_size
    rows.append(LayerRow("head", _count(params["head"]), 2.0 * head_in * config.num_classes))
    return rows


def xla_forward_flops(config: ml_collections.ConfigDict) -> float:
    """FLOPs per image of the lowered forward pass, from XLA's HLO cost analysis (no compile)."""
    model = masked_patch.make_model(config)
    params = param_shapes(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    lowered = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images)
    cost = lowered.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def summarize(config: ml_collections.ConfigDict) -> dict:
    """Parameter count, analytic and XLA GFLOPs per image, and the per-layer table of a config."""
    config_check.validate_model(config.model, config.image_size)
    config_check.positive_int(config, "num_classes")
    config = _unscanned(config)
    rows = layer_table(config)
    analytic = sum(r.flops for r in rows)
    return {
        "variant": config.model.variant,
        "axial": bool(config.model.axial),
        "image_size": config.image_size,
        "num_classes": config.num_classes,
        "objective": config.get("objective", "classification"),
        "params": sum(r.params for r in rows),
        "gflops_per_image": analytic / 1e9,
        "xla_gflops_per_image": xla_forward_flops(config) / 1e9,
        "layers": [dataclasses.asdict(r) for r in rows],
    }


def format_table(summary: dict) -> str:
    """The summary as a human-readable table."""
    lines = [f"{'layer':<36} {'params':>14} {'GFLOPs':>10}"]
    for row in summary["layers"]:
        lines.append(f"{row['name']:<36} {row['params']:>14,} {row['flops'] / 1e9:>10.3f}")
    lines.append("-" * 62)
    lines.append(f"{'total':<36} {summary['params']:>14,} {summary['gflops_per_image']:>10.3f}")
    variant = ("Axial-" if summary["axial"] else "") + summary["variant"]
    target = (f"{summary['num_classes']} classes" if summary["objective"] == "classification"
              else "masked patch prediction")
    lines.append(f"variant {variant} at {summary['image_size']}px, {target}; "
                 f"XLA cost analysis: {summary['xla_gflops_per_image']:.3f} GFLOPs/image (forward, incl. "
                 "elementwise ops)")
    return "\n".join(lines)


def _define_flags() -> None:
    """Flags of the command; defined only when run as a program, so other modules can import summary."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b16.py.", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flag_as_required("config")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    summary = summarize(flags.FLAGS.config)
    if flags.FLAGS.json:
        summary = {k: v for k, v in summary.items() if k != "layers"} | {"layers": summary["layers"]}
        print(json.dumps(summary))
    else:
        print(format_table(summary))


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
