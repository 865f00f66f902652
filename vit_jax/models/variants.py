"""Model sizes of the paper, decoded from a variant string such as "B/16" or "R50+B/16".

One table row per size; a new size is one entry. Hybrids prefix the ViT size with a BiT ResNet
("R50", "R26") whose output grid is cut into 1x1 patches ("B/16" then means: ViT-B, and the
ResNet stem plus stages reduce the image 16x before the transformer; R50+L/32 has a fourth stage).
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

# ResNet name -> {patch size: units per stage} (BiT bottleneck blocks); the stem reduces 4x, each stage after the
# first 2x, so the stages set the patch. As the paper's code (configs/models.py): R50+X/16 takes the output of a
# ResNet-50's stage 3, extended to 9 units; R50+X/32 that of a regular ResNet-50's stage 4.
RESNETS: dict[str, dict[int, tuple[int, ...]]] = {
    "R26": {32: (2, 2, 2, 2)},
    "R50": {16: (3, 4, 9), 32: (3, 4, 6, 3)},
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
    resnet_name, body = name.split("+", 1) if "+" in name else (None, name)
    if resnet_name is not None and resnet_name not in RESNETS:
        raise ValueError(f"unknown ResNet {resnet_name!r} in variant {name!r}; valid: {sorted(RESNETS)}")
    size, _, patch = body.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        raise ValueError(
            f"unknown variant {name!r}; valid: <size>/<patch> with size in {list(SIZES)} and patch in "
            f"{list(PATCH_SIZES)}, optionally prefixed by {'/'.join(RESNETS)}+ (e.g. 'B/16', 'R50+B/16')")
    patch_size = int(patch)
    resnet_layers = None
    if resnet_name is not None:
        trunks = RESNETS[resnet_name]
        if patch_size not in trunks:
            raise ValueError(f"unknown variant {name!r}: {resnet_name} hybrids have patch "
                             f"{' or '.join(map(str, trunks))} (valid: "
                             f"{', '.join(f'{resnet_name}+{size}/{p}' for p in trunks)})")
        resnet_layers = trunks[patch_size]
    hidden, layers, heads, mlp = SIZES[size]
    return Variant(hidden, layers, heads, mlp, patch_size, resnet_layers)


def resnet_stride(resnet_layers: tuple[int, ...]) -> int:
    """Total downsampling of a BiT ResNet trunk: 4 in the stem, 2 per stage after the first."""
    if not resnet_layers:
        raise ValueError("a ResNet trunk has at least one stage (resnet_layers=() is a plain ViT)")
    return 4 * 2 ** (len(resnet_layers) - 1)


def embedding_patch(patch_size: int, resnet_layers: tuple[int, ...] = ()) -> int:
    """The patch embedding's own patch: `patch_size` for a plain ViT; for a hybrid, what is left of it after the
    ResNet trunk's stride (16 // 16 = 1: each trunk output pixel is a token). ValueError when the patch is no
    multiple of that stride."""
    if not resnet_layers:
        return patch_size
    stride = resnet_stride(tuple(resnet_layers))
    if patch_size % stride:
        raise ValueError(f"patch_size={patch_size} is no multiple of the stride {stride} of the ResNet trunk "
                         f"resnet_layers={tuple(resnet_layers)} ({len(resnet_layers)} stages)")
    return patch_size // stride

