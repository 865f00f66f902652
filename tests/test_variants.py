"""Variant strings decode to the paper's table; unknown ones fail with the valid choices."""

import pytest

from vit_jax.models.variants import parse_variant, resnet_stride


def test_paper_table():
    assert parse_variant("B/16").hidden_size == 768
    assert (parse_variant("L/32").num_layers, parse_variant("L/32").patch_size) == (24, 32)
    h = parse_variant("H/14")
    assert (h.hidden_size, h.num_layers, h.num_heads, h.mlp_dim) == (1280, 32, 16, 5120)
    assert parse_variant("R50+B/16").resnet_layers == (3, 4, 9)
    assert parse_variant("R26+S/32").resnet_layers == (2, 2, 2, 2)
    # As the paper's code (configs/models.py): R50+L/32 is a regular ResNet-50's four stages (stride 32).
    assert parse_variant("R50+L/32").resnet_layers == (3, 4, 6, 3)


@pytest.mark.parametrize("name, message", [
    ("X/16", r"unknown variant 'X/16'; valid: <size>/<patch> with size in \['Ti', 'S', 'B', 'L', 'H'\]"),
    ("B/15", r"unknown variant 'B/15'; valid: .* patch in \[8, 14, 16, 32\]"),
    ("B16", r"unknown variant 'B16'; valid: <size>/<patch>"),
    ("R18+B/16", r"unknown ResNet 'R18' in variant 'R18\+B/16'; valid: \['R26', 'R50'\]"),
    ("R26+S/16", r"unknown variant 'R26\+S/16': R26 hybrids have patch 32 \(valid: R26\+S/32\)"),
    ("R50+B/8", r"R50 hybrids have patch 16 or 32 \(valid: R50\+B/16, R50\+B/32\)"),
])
def test_unknown_variant_lists_valid(name, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(name)


def test_resnet_stride_of_no_stages_is_refused():
    with pytest.raises(ValueError, match="at least one stage"):
        resnet_stride(())
