"""Shared pieces of the interop tests (tiny models with random weights), and tests of the key/shape check."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from vit_jax.interop.common import (
    CheckpointError,
    canonical_to_params,
    check_matches,
    flatten,
    params_to_canonical,
    posemb_sincos_2d,
    unflatten,
    with_class_token_slot,
)
from vit_jax.models.vit import build_model

IMAGE_SIZE = 32


def tiny_config(classifier: str = "token", representation_size: int = 0, resnet_layers: tuple = (),
                scan: bool = False, gelu_approximate: bool = True, layernorm_epsilon: float = 1e-6,
                patch_size: int = 8) -> ml_collections.ConfigDict:
    """A 2-block, width-64 ViT (or a 2-stage hybrid) small enough for CPU tests."""
    m = common.model_config("Ti/16")
    m.variant = "custom"
    m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim, m.patch_size = 64, 2, 4, 128, patch_size
    m.classifier, m.representation_size, m.resnet_layers, m.scan = classifier, representation_size, resnet_layers, scan
    m.gelu_approximate, m.layernorm_epsilon, m.dropout_rate = gelu_approximate, layernorm_epsilon, 0.0
    return m


def random_params(model_config: ml_collections.ConfigDict, num_classes: int, image_size: int = IMAGE_SIZE,
                  seed: int = 0) -> dict:
    """Params with every leaf perturbed, so zero-initialised heads, class tokens and norms matter: an init-like
    start from numpy (LayerNorm scales 1, kernels N(0, 0.1), biases 0) of the shapes `model.init` gives (eval_shape:
    nothing compiled; a jitted init cost 2-6 s per config and class count), then noise."""
    model = build_model(model_config, num_classes)
    images = jnp.zeros((1, image_size, image_size, 3))
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(seed), images))["params"])
    rng = np.random.default_rng(seed)
    base = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if jax.tree_util.keystr(path).endswith("['scale']") else
                         rng.normal(0.0, 0.1, s.shape).astype(np.float32) if len(s.shape) >= 2 else
                         np.zeros(s.shape, np.float32)), shapes)
    flat = params_to_canonical(base)
    flat = {k: (v + rng.normal(0.0, 0.2 if v.ndim < 2 else 0.05, v.shape)).astype(np.float32)
            for k, v in flat.items()}
    return canonical_to_params(flat, model_config.scan)


def random_images(batch: int = 2, image_size: int = IMAGE_SIZE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)


def logits_of(model_config: ml_collections.ConfigDict, params: dict, images: np.ndarray) -> np.ndarray:
    num_classes = flatten(params)["head/bias"].shape[-1]
    model = build_model(model_config, num_classes)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))


def test_flatten_unflatten_round_trip_and_scan_layout():
    config = tiny_config(scan=True)
    params = random_params(config, 5)
    assert "encoderblock" in params["Transformer"]
    flat = params_to_canonical(params)
    assert flat["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].shape == (64, 128)
    np.testing.assert_array_equal(flat["Transformer/encoderblock_1/LayerNorm_0/scale"],
                                  params["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"][1])
    restacked = canonical_to_params(flat, scan=True)
    np.testing.assert_array_equal(flatten(restacked)["Transformer/encoderblock/MlpBlock_3/Dense_1/bias"],
                                  flatten(params)["Transformer/encoderblock/MlpBlock_3/Dense_1/bias"])
    assert unflatten(flatten({"a": {"b": np.ones(2)}}))["a"]["b"].shape == (2,)


def test_check_matches_lists_every_missing_unexpected_and_wrong_shaped_key():
    expected = {"a/kernel": (2, 3), "b/bias": (3,), "c/scale": (4,)}
    flat = {"a/kernel": np.zeros((3, 2)), "c/scale": np.zeros(4), "d/extra": np.zeros(7)}
    with pytest.raises(CheckpointError) as e:
        check_matches(flat, expected, "x.npz")
    message = str(e.value)
    assert "x.npz" in message
    assert "missing 1 key(s): b/bias (model (3,))" in message
    assert "unexpected 1 key(s): d/extra (checkpoint (7,))" in message
    assert "a/kernel (checkpoint (3, 2), model (2, 3))" in message
    check_matches({"c/scale": np.zeros(4)}, {"c/scale": (4,)}, "ok")  # a full match passes
    assert message.startswith("x.npz does not fit the model: ")  # no architecture keys: no cause line


def test_check_matches_opens_with_the_architecture_difference():
    wide = tiny_config()
    wide.hidden_size, wide.mlp_dim, wide.num_layers = 96, 192, 3
    flat = params_to_canonical(random_params(wide, 7))
    expected = {k: tuple(v.shape) for k, v in params_to_canonical(random_params(tiny_config(), 5)).items()}
    with pytest.raises(CheckpointError) as e:
        check_matches(flat, expected, "wide.npz")
    message = str(e.value)
    assert message.startswith("wide.npz does not fit the model (checkpoint num_layers 3, hidden_size 96, "
                              "mlp_dim 192, classes 7 vs model 2, 64, 128, 5): "), message[:200]
    assert "unexpected" in message and "encoderblock_2" in message  # the full key list still follows


def test_with_class_token_slot_follows_what_is_known_and_guesses_only_from_a_square_count():
    square, with_slot = np.ones((1, 16, 8), np.float32), np.ones((1, 17, 8), np.float32)
    assert with_class_token_slot(square, has_cls=True).shape == (1, 17, 8)  # the guess: no slot yet
    assert with_class_token_slot(with_slot, has_cls=True) is with_slot
    assert with_class_token_slot(square, has_cls=True, has_slot=True) is square  # told: 1 + 15 patches
    assert with_class_token_slot(with_slot, has_cls=True, has_slot=False).shape == (1, 18, 8)
    assert with_class_token_slot(square, has_cls=False, has_slot=False) is square  # no class token: no slot
    assert not with_class_token_slot(square, has_cls=True)[:, 0].any()


def test_sincos_posemb_needs_a_width_of_four_parts():
    assert posemb_sincos_2d(2, 3, 8).shape == (1, 6, 8)
    with pytest.raises(CheckpointError, match="sin-cos position embeddings of width 66: expected a multiple of 4"):
        posemb_sincos_2d(2, 2, 66)


def test_an_atomic_write_is_synced_to_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """Without the fsync a power loss after the rename could leave an empty file where the checkpoint was; each
    call writes its own temp file (two threads writing one path shared `path.tmp-PID`)."""
    import os

    from vit_jax.interop.common import write_atomically

    events, temps = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # the file the descriptor is open on
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def write(tmp):
        temps.append(tmp)
        with open(tmp, "w") as f:
            f.write("weights")

    path = tmp_path / "vit.npz"
    write_atomically(str(path), write)
    write_atomically(str(path), write)
    assert path.read_text() == "weights" and os.listdir(tmp_path) == ["vit.npz"]
    assert temps[0] != temps[1]
    assert events[:2] == [("fsync", temps[0]), ("replace", temps[0])]
