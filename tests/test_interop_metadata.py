"""What timm / HF weights say beyond their tensors: numerics (GELU flavour, LayerNorm eps) and head count, from
our safetensors metadata, an HF config.json or a timm hub config.json — the same for loading and for
`apply_source_numerics`. No torch needed: files are written with safetensors.numpy."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from tests.test_interop_common import random_params, tiny_config
from vit_jax.interop import CheckpointError, apply_source_numerics, load_pretrained, save_as, torch_hub
from vit_jax.interop.common import params_to_canonical

NUM_CLASSES = 5


def _log(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def _timm_file(path, num_heads: int = 4, metadata: dict | None = None) -> str:
    """A timm state dict of a tiny model with `num_heads` heads, as timm writes it: no metadata of ours."""
    config = tiny_config()
    config.num_heads = num_heads
    flat = params_to_canonical(random_params(config, NUM_CLASSES))
    torch_hub.write_safetensors(torch_hub.canonical_to_timm(flat), str(path), metadata=metadata)
    return str(path)


def _timm_hub_dir(tmp_path, model_args: dict | None = None, architecture: str = "vit_custom") -> str:
    """A timm hub download: config.json (timm's: 'architecture', no 'model_type') + model.safetensors."""
    hub = tmp_path / "timm_hub"
    hub.mkdir()
    _timm_file(hub / "model.safetensors")
    cfg = {"architecture": architecture, "num_classes": NUM_CLASSES, "num_features": 64,
           "pretrained_cfg": {"tag": "test"}}
    if model_args is not None:
        cfg["model_args"] = model_args
    (hub / "config.json").write_text(json.dumps(cfg))
    return str(hub)


# --------------------------------------------------------------------------------- numerics (fixes 1, 7, 8)


def test_a_timm_hub_directory_gets_the_same_numerics_from_source_numerics_as_from_loading(tmp_path):
    """Its config.json was read as HF's (exact GELU, eps 1e-12), while loading gave timm's (eps 1e-6)."""
    hub = _timm_hub_dir(tmp_path, model_args={"num_heads": 4, "act_layer": "gelu"})
    config = tiny_config(gelu_approximate=True, layernorm_epsilon=1e-3)
    numerics = apply_source_numerics(hub, config)
    assert (numerics.gelu_approximate, numerics.layernorm_epsilon) == (False, 1e-6)
    loaded_config = tiny_config(gelu_approximate=True, layernorm_epsilon=1e-3)
    load_pretrained(hub, loaded_config)
    assert (config.gelu_approximate, config.layernorm_epsilon) == (loaded_config.gelu_approximate,
                                                                   loaded_config.layernorm_epsilon) == (False, 1e-6)


def test_hf_weights_beside_a_config_json_without_model_type_read_it_with_a_warning(tmp_path, caplog):
    """Such a file loaded before model_type was looked at: it still does, its activation and eps taken, with a
    warning (the weights' keys say HF)."""
    import logging

    save_as(random_params(tiny_config(), NUM_CLASSES), tiny_config(), str(tmp_path / "hf"), "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_type"]
    cfg["hidden_act"], cfg["layer_norm_eps"] = "gelu_pytorch_tanh", 1e-5
    cfg_path.write_text(json.dumps(cfg))
    caplog.set_level(logging.WARNING)
    for read in (lambda config: load_pretrained(str(tmp_path / "hf"), config),
                 lambda config: apply_source_numerics(str(tmp_path / "hf"), config)):
        config = tiny_config()
        read(config)
        assert (config.gelu_approximate, config.layernorm_epsilon) == (True, 1e-5)
    assert f"{cfg_path}: has no model_type; read as an HF ViT config" in caplog.text


def test_an_unreadable_config_json_beside_timm_weights_is_ignored_with_a_warning(tmp_path, caplog):
    import logging

    from vit_jax.interop import torch_hub

    (tmp_path / "config.json").write_text("{not json")
    caplog.set_level(logging.WARNING)
    assert torch_hub.timm_config_facts(str(tmp_path / "config.json")) == {}  # as if there were none
    assert "unreadable config.json" in caplog.text


@pytest.mark.parametrize("act_layer, approximate", [("gelu_tanh", True), ("gelu", False), (None, False)])
def test_the_activation_of_a_timm_config_json_beside_the_file_is_used(tmp_path, act_layer, approximate):
    """timm's SigLIP-GAP models use tanh GELU; they loaded with timm's default exact GELU."""
    hub = _timm_hub_dir(tmp_path, model_args={"num_heads": 4, "act_layer": act_layer})
    for weights in (hub, os.path.join(hub, "model.safetensors")):
        config = tiny_config(gelu_approximate=not approximate)
        load_pretrained(weights, config)
        assert config.gelu_approximate is approximate and config.layernorm_epsilon == 1e-6
        config = tiny_config(gelu_approximate=not approximate)
        apply_source_numerics(weights, config)
        assert config.gelu_approximate is approximate


@pytest.mark.parametrize("model_args, message", [
    ({"num_heads": 4, "act_layer": "quick_gelu"},
     r"config.json: model_args act_layer='quick_gelu' is not supported; valid: \['gelu', 'gelu_tanh'\]"),
    ({"num_heads": 8, "act_layer": "gelu"},
     r"config.json: model_args num_heads=8 but the model config has num_heads=4"),
])
def test_a_timm_config_json_this_model_cannot_follow_is_refused(tmp_path, model_args, message):
    """An activation this model does not compute, or another head count (same arrays, other logits)."""
    hub = _timm_hub_dir(tmp_path, model_args=model_args)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(hub, tiny_config())


def test_timm_weights_without_metadata_log_the_assumed_exact_gelu(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = _timm_file(tmp_path / "timm.safetensors")
    config = tiny_config(gelu_approximate=True)
    load_pretrained(path, config)
    assert config.gelu_approximate is False
    assert f"{path}: no numerics recorded and no timm config.json beside it giving the activation: assuming " \
           "timm's default exact GELU" in _log(caplog)


@pytest.mark.parametrize("gelu_approximate, eps", [(True, 1e-6), (False, 1e-5)])
def test_an_hf_model_safetensors_copied_without_its_config_keeps_its_numerics(tmp_path, gelu_approximate, eps):
    config = tiny_config(gelu_approximate=gelu_approximate, layernorm_epsilon=eps)
    save_as(random_params(config, NUM_CLASSES), config, str(tmp_path / "hf"), "hf")
    (tmp_path / "copy").mkdir()
    copied = str(tmp_path / "copy" / "model.safetensors")
    shutil.copy(tmp_path / "hf" / "model.safetensors", copied)
    loaded = tiny_config(gelu_approximate=not gelu_approximate, layernorm_epsilon=1e-3)
    load_pretrained(copied, loaded)
    assert (loaded.gelu_approximate, loaded.layernorm_epsilon) == (gelu_approximate, eps)
    numerics = apply_source_numerics(copied, tiny_config())
    assert (numerics.gelu_approximate, numerics.layernorm_epsilon) == (gelu_approximate, eps)


# ----------------------------------------------------------------------------------- head count (fix 2)


@pytest.mark.parametrize("target", ["timm", "hf"])
def test_an_export_with_other_heads_is_refused_naming_both_counts(tmp_path, target):
    """8 heads of width 8 hold the same arrays as 4 of width 16: it loaded silently, computing other logits."""
    eight = tiny_config()
    eight.num_heads = 8
    out = str(tmp_path / ("vit.safetensors" if target == "timm" else "hf"))
    save_as(random_params(eight, NUM_CLASSES), eight, out, target)
    weights = out if target == "timm" else os.path.join(out, "model.safetensors")
    if target == "hf":
        os.remove(os.path.join(out, "config.json"))  # its num_attention_heads was checked already
    with pytest.raises(CheckpointError, match=f"^{weights}: metadata vit_jax.num_heads=8 but the model config has "
                                              r"num_heads=4; pick the matching --config / model.num_heads"):
        load_pretrained(weights, tiny_config())
    load_pretrained(weights, eight)


def test_a_head_count_nothing_records_is_logged_as_unchecked(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = _timm_file(tmp_path / "timm.safetensors")
    load_pretrained(path, tiny_config())
    assert f"{path}: the attention head count could not be checked" in _log(caplog)
