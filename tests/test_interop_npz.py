"""Official / big_vision `.npz` checkpoints: round trips, the big_vision variants, timm as an independent reader."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.test_interop_common import IMAGE_SIZE, logits_of, random_images, random_params, tiny_config
from vit_jax.interop import CheckpointError, detect_format, load_pretrained, save_as
from vit_jax.interop.common import POSEMB_KEY, canonical_to_params, flatten, params_to_canonical


@pytest.mark.parametrize("kwargs", [
    dict(classifier="token"),
    dict(classifier="gap"),
    dict(classifier="token", representation_size=32),
    dict(classifier="token", scan=True),
], ids=["token", "gap", "pre_logits", "scan"])
def test_official_npz_round_trip_gives_the_same_logits(tmp_path, kwargs):
    config = tiny_config(**kwargs)
    params = random_params(config, 7)
    path = str(tmp_path / "vit.npz")
    save_as(params, config, path, "npz")
    with np.load(path, allow_pickle=False) as f:  # the original layout, flat keys, no scan
        assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in f.files
        assert ("pre_logits/kernel" in f.files) == bool(kwargs.get("representation_size"))
    assert detect_format(path) == "npz"
    # Numerics unlike the npz's (official ViTs: tanh GELU, eps 1e-6): loading sets them back to the weights'.
    loaded_config = tiny_config(**kwargs, gelu_approximate=False, layernorm_epsilon=1e-12)
    loaded = load_pretrained(path, loaded_config)
    assert loaded_config.gelu_approximate is True and loaded_config.layernorm_epsilon == 1e-6
    images = random_images()
    np.testing.assert_array_equal(logits_of(loaded_config, loaded, images), logits_of(config, params, images))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_written_npz_matches_timm_load_weights_as_independent_reader(tmp_path, classifier):
    torch = pytest.importorskip("torch")
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    config = tiny_config(classifier=classifier)
    params = random_params(config, 6)
    path = str(tmp_path / "vit.npz")
    save_as(params, config, path, "npz")
    gap = classifier == "gap"
    model = VisionTransformer(img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=6, global_pool="avg" if gap else "token", class_token=not gap,
                              fc_norm=False, act_layer=lambda: torch.nn.GELU(approximate="tanh")).eval()
    _load_weights(model, path)
    images = random_images()
    with torch.no_grad():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits_of(config, params, images), expected, atol=1e-4, rtol=0)


def _big_vision_layout(flat: dict, scanned: bool, prefix: str) -> dict:
    """Re-express canonical params the way big_vision stores them."""
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
               "MlpBlock_3": "MlpBlock_0"}
    out, blocks = {}, {}
    for key, value in flat.items():
        if key.startswith("Transformer/encoderblock_"):
            _, block, module, rest = key.split("/", 3)
            blocks.setdefault(f"{renames.get(module, module)}/{rest}", {})[int(block.split("_")[1])] = value
        elif key == POSEMB_KEY:
            out["pos_embedding"] = value[:, 1:] if "cls" in flat else value
        else:
            out[key] = value
    for sub, per_block in blocks.items():
        if scanned:
            out[f"Transformer/encoderblock/{sub}"] = np.stack([per_block[i] for i in sorted(per_block)])
        else:
            out.update({f"Transformer/encoderblock_{i}/{sub}": v for i, v in per_block.items()})
    return {prefix + k: v for k, v in out.items()}


@pytest.mark.parametrize("scanned, prefix, other_tower", [
    (True, "params/", None), (False, "params/img/", "params/txt/Dense_0/kernel"), (True, "", None)])
def test_big_vision_npz_variants_load(tmp_path, scanned, prefix, other_tower):
    config = tiny_config(classifier="token")
    params = random_params(config, 5)
    flat = params_to_canonical(params)
    # big_vision adds no position embedding to the class token: a zero slot is exactly equivalent.
    flat[POSEMB_KEY][:, 0] = 0.0
    bv = _big_vision_layout(flat, scanned, prefix)
    if other_tower:  # a two-tower file: only the image tower is read
        bv[other_tower] = np.zeros((3, 3), np.float32)
    path = str(tmp_path / "bv.npz")
    np.savez(path, **bv)
    loaded = load_pretrained(path, tiny_config(classifier="token"))
    for key, value in flatten(loaded).items():
        np.testing.assert_array_equal(value, flat[key], err_msg=key)


def test_opt_target_prefix_and_singleton_group_norm_axes(tmp_path):
    config = tiny_config(resnet_layers=(1, 1))
    params = random_params(config, 4)
    flat = params_to_canonical(params)
    old = {}
    for key, value in flat.items():
        if "/gn" in f"/{key}" and key.rsplit("/", 1)[1] in ("scale", "bias"):
            value = value.reshape(1, 1, 1, -1)  # as stored by older hybrid files
        old[f"opt/target/{key}"] = value
    old["opt/state/step"] = np.zeros((), np.float32)
    path = str(tmp_path / "old.npz")
    np.savez(path, **old)
    loaded = load_pretrained(path, tiny_config(resnet_layers=(1, 1)))
    for key, value in flatten(loaded).items():
        np.testing.assert_array_equal(value, flat[key], err_msg=key)


def test_hybrid_npz_round_trip(tmp_path):
    config = tiny_config(resnet_layers=(1, 1))  # a two-stage BiT trunk (stride 8) + 1x1 patches
    params = random_params(config, 9)
    assert "block2" in params and "conv_root" in params
    path = str(tmp_path / "hybrid.npz")
    save_as(params, config, path, "npz")
    with np.load(path, allow_pickle=False) as f:
        assert f["block2/unit1/conv_proj/kernel"].shape == (1, 1, 256, 512)
        assert f["gn_root/scale"].shape == (64,)
    loaded_config = tiny_config(resnet_layers=(1, 1))
    loaded = load_pretrained(path, loaded_config)
    images = random_images()
    np.testing.assert_array_equal(logits_of(loaded_config, loaded, images), logits_of(config, params, images))


def test_hybrid_npz_matches_timm_resnetv2_hybrid_as_independent_model(tmp_path):
    """The BiT trunk (stem padding, stride on the 3x3 conv, projection shortcuts, GroupNorm(32), weight
    standardisation) against timm's port of the official hybrid, reading our .npz with its own loader."""
    torch = pytest.importorskip("torch")
    from functools import partial

    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    config = tiny_config(resnet_layers=(1, 1))  # stride-8 trunk, 1x1 patches (the pooling is the plain ViT's)
    params = random_params(config, 9)
    path = str(tmp_path / "hybrid.npz")
    save_as(params, config, path, "npz")
    # timm's hybrids standardise with sqrt(var + 1e-8) where BiT divides by std + 1e-5 (a ~1e-4 relative
    # difference, which the GroupNorm after each conv removes); its GroupNorm eps is set to the official 1e-6.
    backbone = ResNetV2(layers=(1, 1), num_classes=0, global_pool="", preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=32, eps=1e-6))
    model = VisionTransformer(img_size=IMAGE_SIZE, patch_size=1, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=9, global_pool="token", fc_norm=False,
                              act_layer=lambda: torch.nn.GELU(approximate="tanh"),
                              embed_layer=partial(HybridEmbed, backbone=backbone)).eval()
    _load_weights(model, path)
    images = random_images()
    with torch.no_grad():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits_of(config, params, images), expected, atol=1e-4, rtol=0)


def test_map_head_checkpoint_is_refused_by_name(tmp_path):
    flat = params_to_canonical(random_params(tiny_config(), 3))
    flat["MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    path = str(tmp_path / "map.npz")
    np.savez(path, **flat)
    from vit_jax.interop import CheckpointError

    with pytest.raises(CheckpointError, match="MAPHead_0"):
        load_pretrained(path, tiny_config())


@pytest.mark.parametrize("key, class_slot", [
    ("Transformer/pos_embedding", True),  # big_vision before 2022: in the encoder, the class token's entry first
    ("pos_embedding", True),  # top level, but still with the class token's entry
    ("Transformer/pos_embedding", False),  # in the encoder, without it
], ids=["encoder_with_slot", "top_level_with_slot", "encoder_without_slot"])
def test_older_big_vision_posemb_layouts_give_the_canonical_logits(tmp_path, key, class_slot):
    """As big_vision's fix_old_checkpoints: the encoder's posemb moves to the top level, and only a g*g one (no
    class-token slot) gets a zero slot; a 1+g*g one is used as is."""
    config = tiny_config(classifier="token")
    params = random_params(config, 8)
    flat = params_to_canonical(params)
    if not class_slot:
        flat[POSEMB_KEY][:, 0] = 0.0  # what a posemb without the slot computes
        params = canonical_to_params(flat, scan=False)
    bv = _big_vision_layout(flat, scanned=True, prefix="params/")
    del bv["params/pos_embedding"]
    bv[f"params/{key}"] = flat[POSEMB_KEY] if class_slot else flat[POSEMB_KEY][:, 1:]
    path = str(tmp_path / "old_bv.npz")
    np.savez(path, **bv)
    loaded_config = tiny_config(classifier="token")
    loaded = load_pretrained(path, loaded_config)
    np.testing.assert_array_equal(flatten(loaded)[POSEMB_KEY], flat[POSEMB_KEY])
    images = random_images()
    np.testing.assert_array_equal(logits_of(loaded_config, loaded, images), logits_of(config, params, images))


def test_save_as_never_replaces_an_existing_file_unless_told_to(tmp_path):
    config = tiny_config()
    path = tmp_path / "vit.npz"
    path.write_bytes(b"earlier work")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: exists; give a new file name"):
        save_as(random_params(config, 3), config, str(path), "npz")
    assert path.read_bytes() == b"earlier work"

    params = random_params(config, 3, seed=4)
    save_as(params, config, str(path), "npz", overwrite=True)
    np.testing.assert_array_equal(flatten(load_pretrained(str(path), tiny_config()))["head/kernel"],
                                  params_to_canonical(params)["head/kernel"])


def _sincos_reference(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's posemb_sincos_2d written out entry by entry: token t at row t // w, column t % w."""
    quarter = width // 4
    out = np.zeros((h * w, width))
    for t in range(h * w):
        row, col = divmod(t, w)
        for d in range(quarter):
            omega = temperature ** (-d / (quarter - 1))
            out[t, d], out[t, quarter + d] = np.sin(col * omega), np.cos(col * omega)
            out[t, 2 * quarter + d], out[t, 3 * quarter + d] = np.sin(row * omega), np.cos(row * omega)
    return out[None]


@pytest.mark.parametrize("classifier", ["gap", "token"])
def test_big_vision_sincos2d_npz_gets_its_fixed_embeddings_for_the_target_grid(tmp_path, caplog, classifier):
    """big_vision's posemb='sincos2d' models (its plain ViT-S/16 i1k baselines) store no position embeddings: they
    were refused as "missing 1 key(s): Transformer/posembed_input/pos_embedding"."""
    import logging

    config = tiny_config(classifier=classifier)
    flat = params_to_canonical(random_params(config, 5))
    bv = _big_vision_layout(flat, scanned=True, prefix="params/")
    del bv["params/pos_embedding"]
    path = str(tmp_path / "vit_s16_i1k_90ep.npz")
    np.savez(path, **bv)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path}: no position-embedding parameter ({POSEMB_KEY}): a big_vision posemb='sincos2d' model? Its "
            "fixed sin-cos embeddings are built for the grid of the image_size given: pass image_size")):
        load_pretrained(path, tiny_config(classifier=classifier))

    caplog.set_level(logging.INFO)
    loaded = flatten(load_pretrained(path, tiny_config(classifier=classifier), image_size=48))  # a 6x6 grid
    expected = _sincos_reference(6, 6, 64)
    if classifier == "token":
        expected = np.concatenate([np.zeros((1, 1, 64)), expected], axis=1)
    np.testing.assert_allclose(loaded[POSEMB_KEY], expected, atol=1e-6, rtol=0)
    for key, value in flat.items():
        if key != POSEMB_KEY:
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{path}: no position-embedding parameter (a big_vision posemb='sincos2d' model): built its fixed " \
           f"2-D sin-cos embeddings for the 6x6 patch grid" in logged
