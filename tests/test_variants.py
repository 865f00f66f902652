"""Variant strings decode to the paper's table; unknown ones fail with the valid choices."""

import pytest

from vit_jax.models.variants import parse_variant


def test_paper_table():
    assert parse_variant("B/16").hidden_size == 768
    assert (parse_variant("L/32").num_layers, parse_variant("L/32").patch_size) == (24, 32)
    h = parse_variant("H/14")
    assert (h.hidden_size, h.num_layers, h.num_heads, h.mlp_dim) == (1280, 32, 16, 5120)
    assert parse_variant("R50+B/16").resnet_layers == (3, 4, 9)
    assert parse_variant("R26+S/32").resnet_layers == (2, 2, 2, 2)


@pytest.mark.parametrize("name", ["X/16", "B/15", "B16", "R18+B/16", "R26+S/16"])
def test_unknown_variant_lists_valid(name):
    with pytest.raises(ValueError, match="valid|stride"):
        parse_variant(name)
