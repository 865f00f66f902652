"""Model sizes of the paper, decoded from a variant string such as "B/16" or "R50+B/16".

One table row per size; a new size is one entry. Hybrids prefix the ViT size with a BiT ResNet
("R50", "R26") whose output grid is cut into 1x1 patches ("B/16" then means: ViT-B, and the
ResNet stem plus stages reduce the image 16x before the transformer).
"""

from __future__ import annotations

import dataclasses

# name -> (hidden_size, num_layers, num_heads, mlp_dim); the paper's Table 1 and its code.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
PATCH_SIZES = (8, 14, 16, 32)

# ResNet name -> units per stage (BiT bottleneck blocks); the stem reduces 4x, each stage after the first 2x.
RESNETS: dict[str, tuple[int, ...]] = {
    "R26": (2, 2, 2, 2),
    "R50": (3, 4, 9),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """The architecture numbers a variant string stands for."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    resnet_layers: tuple[int, ...] | None = None


def parse_variant(name: str) -> Variant:
    """Decode "B/16" or "R50+B/16" into its numbers; unknown names raise ValueError listing valid ones."""
    resnet_layers = None
    body = name
    if "+" in name:
        resnet_name, body = name.split("+", 1)
        if resnet_name not in RESNETS:
            raise ValueError(f"unknown ResNet {resnet_name!r} in variant {name!r}; valid: {sorted(RESNETS)}")
        resnet_layers = RESNETS[resnet_name]
    size, _, patch = body.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        raise ValueError(
            f"unknown variant {name!r}; valid: <size>/<patch> with size in {list(SIZES)} and patch in "
            f"{list(PATCH_SIZES)}, optionally prefixed by {'/'.join(RESNETS)}+ (e.g. 'B/16', 'R50+B/16')")
    patch_size = int(patch)
    if resnet_layers is not None:
        stride = resnet_stride(resnet_layers)
        if patch_size % stride:
            raise ValueError(f"variant {name!r}: patch {patch_size} is not a multiple of the ResNet stride {stride}")
    hidden, layers, heads, mlp = SIZES[size]
    return Variant(hidden, layers, heads, mlp, patch_size, resnet_layers)


def resnet_stride(resnet_layers: tuple[int, ...]) -> int:
    """Total downsampling of a BiT ResNet trunk: 4 in the stem, 2 per stage after the first."""
    return 4 * 2 ** (len(resnet_layers) - 1)
