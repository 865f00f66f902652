"""Fine-tuning surgery: position-embedding resize against independent interpolations, heads, pre_logits."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.ndimage

from vit_jax.interop import CheckpointError, adapt_to_model, new_head, resize_posemb
from vit_jax.interop.common import POSEMB_KEY


def _posemb(grid: int, prefix: int = 1, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, prefix + grid * grid, dim)).astype(np.float32)


def test_14_to_24_bilinear_keeps_the_class_token_and_matches_scipy_zoom():
    posemb = _posemb(14)
    resized = resize_posemb(posemb, 24)
    assert resized.shape == (1, 1 + 24 * 24, 8) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
    # The original vision_transformer code: scipy.ndimage.zoom(order=1) of the (14, 14, D) grid.
    grid = posemb[0, 1:].reshape(14, 14, 8).astype(np.float64)
    reference = scipy.ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1)
    np.testing.assert_allclose(resized[0, 1:], reference.reshape(576, 8), atol=1e-6)


def test_14_to_24_bicubic_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    posemb = _posemb(14, seed=1)
    resized = resize_posemb(posemb, 24, method="bicubic")
    np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])
    grid = torch.from_numpy(posemb[0, 1:].reshape(1, 14, 14, 8)).permute(0, 3, 1, 2).double()
    reference = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    reference = reference.permute(0, 2, 3, 1).reshape(576, 8).numpy()
    np.testing.assert_allclose(resized[0, 1:], reference, atol=1e-6)


def test_identity_resize_is_a_no_op_and_gap_grids_have_no_prefix():
    posemb = _posemb(14)
    assert resize_posemb(posemb, 14) is posemb
    gap = _posemb(4, prefix=0)
    resized = resize_posemb(gap, (6, 6), num_prefix_tokens=0)
    reference = scipy.ndimage.zoom(gap[0].reshape(4, 4, 8).astype(np.float64), (1.5, 1.5, 1), order=1)
    np.testing.assert_allclose(resized[0], reference.reshape(36, 8), atol=1e-6)


def test_a_non_square_grid_cannot_be_resized():
    with pytest.raises(CheckpointError, match="not a square grid"):
        resize_posemb(np.zeros((1, 1 + 15, 8), np.float32), 4)
    with pytest.raises(ValueError, match="resize method must be one of"):
        resize_posemb(_posemb(4), 6, method="nearest")


def test_a_non_square_checkpoint_grid_is_refused_naming_the_source():
    """adapt_to_model's resize error says which checkpoint holds the non-square grid."""
    flat = {"cls": np.zeros((1, 1, 8), np.float32), POSEMB_KEY: np.zeros((1, 1 + 15, 8), np.float32)}
    expected = {"cls": (1, 1, 8), POSEMB_KEY: (1, 1 + 36, 8)}
    with pytest.raises(CheckpointError, match=r"^odd\.safetensors \(timm\): position embeddings of 16 tokens "
                                              r"\(1 prefix\) are not a square grid"):
        adapt_to_model(flat, expected, source="odd.safetensors (timm)")


def _checkpoint(classes: int = 21, pre_logits: int = 0) -> dict:
    rng = np.random.default_rng(2)
    flat = {"cls": rng.normal(size=(1, 1, 8)), POSEMB_KEY: _posemb(4), "encoder/kernel": rng.normal(size=(8, 8))}
    width = pre_logits or 8
    if pre_logits:
        flat.update({"pre_logits/kernel": rng.normal(size=(8, pre_logits)), "pre_logits/bias": np.ones(pre_logits)})
    flat.update({"head/kernel": rng.normal(size=(width, classes)), "head/bias": rng.normal(size=(classes,))})
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def test_adapt_drops_pre_logits_and_starts_a_zero_head_with_its_bias_init():
    flat = _checkpoint(pre_logits=16)
    expected = {"cls": (1, 1, 8), POSEMB_KEY: (1, 17, 8), "encoder/kernel": (8, 8), "head/kernel": (8, 21),
                "head/bias": (21,)}
    adapted, actions = adapt_to_model(flat, expected, head_bias_init=-2.0)
    assert "pre_logits/kernel" not in adapted
    assert not adapted["head/kernel"].any() and (adapted["head/bias"] == -2.0).all()
    assert actions == ["dropped pre_logits (16 units): the model has representation_size=0",
                       "new zero-initialised head with 21 classes (its input was the dropped pre_logits)"]
    np.testing.assert_array_equal(adapted["encoder/kernel"], flat["encoder/kernel"])


def test_adapt_keeps_a_fitting_head_and_pre_logits_untouched():
    flat = _checkpoint(pre_logits=16)
    expected = {k: v.shape for k, v in flat.items()}
    adapted, actions = adapt_to_model(flat, expected)
    assert actions == []
    for key, value in flat.items():
        np.testing.assert_array_equal(adapted[key], value)


def test_adapt_resets_a_fitting_head_when_asked_and_keeps_the_rest():
    flat = _checkpoint()
    expected = {k: v.shape for k, v in flat.items()}
    adapted, actions = adapt_to_model(flat, expected, reset_head=True, head_bias_init=-1.0)
    assert actions == ["new zero-initialised head with 21 classes (fine-tuning starts from a new head; the "
                       "checkpoint's has the same class count)"]
    assert not adapted["head/kernel"].any() and (adapted["head/bias"] == -1.0).all()
    for key in ("cls", POSEMB_KEY, "encoder/kernel"):
        np.testing.assert_array_equal(adapted[key], flat[key])


@pytest.mark.parametrize("classes, pre_logits, reason", [
    (10, 0, "the checkpoint's head has 10 classes, and a new head would score chance; evaluate a checkpoint "
            "trained for these classes"),
    (21, 16, "its input was the dropped pre_logits, and a new head would score chance; set "
             "model.representation_size=16 to keep them"),
])
def test_evaluation_refuses_a_head_that_cannot_serve_instead_of_a_new_one(classes, pre_logits, reason):
    flat = _checkpoint(classes, pre_logits)
    expected = {"cls": (1, 1, 8), POSEMB_KEY: (1, 17, 8), "encoder/kernel": (8, 8), "head/kernel": (8, 21),
                "head/bias": (21,)}
    with pytest.raises(CheckpointError, match=rf"^ckpt.npz: cannot be evaluated as a 21-class classifier: "
                                              rf"{re.escape(reason)}"):
        adapt_to_model(flat, expected, require_head=True, source="ckpt.npz")
    fitting = _checkpoint()
    with pytest.raises(CheckpointError, match=r"^ckpt.npz: cannot be evaluated as a 21-class classifier: its input is "
                                              r"the new pre_logits, and a new head would score chance; set "
                                              r"model.representation_size=0 \(the checkpoint has no pre_logits\)$"):
        adapt_to_model(fitting, {**{k: v.shape for k, v in fitting.items()}, "pre_logits/kernel": (8, 16),
                                 "pre_logits/bias": (16,), "head/kernel": (16, 21)}, require_head=True,
                       source="ckpt.npz")
    adapted, actions = adapt_to_model(fitting, {k: v.shape for k, v in fitting.items()}, require_head=True)
    assert actions == [] and adapted["head/kernel"] is fitting["head/kernel"]


@pytest.mark.parametrize("require_head", [True, False])
def test_a_model_of_another_width_is_named_not_blamed_on_the_head(require_head):
    """A checkpoint of width 8 in a width-12 model: the head's input differs with everything else. Evaluation said
    "the checkpoint's head has 21 classes ... fine-tune this one first"; fine-tuning put a new head in silence."""
    flat = {**_checkpoint(), "Transformer/encoder_norm/scale": np.ones(8, np.float32)}
    expected = {"cls": (1, 1, 12), POSEMB_KEY: (1, 17, 12), "encoder/kernel": (12, 12), "head/kernel": (12, 21),
                "head/bias": (21,), "Transformer/encoder_norm/scale": (12,)}
    with pytest.raises(CheckpointError, match=r"^ckpt.npz does not fit the model \(checkpoint hidden_size 8 vs "
                                              r"model 12\): wrong shape for 5 key\(s\): .*head/kernel "
                                              r"\(checkpoint \(8, 21\), model \(12, 21\)\)"):
        adapt_to_model(flat, expected, require_head=require_head, source="ckpt.npz")


def test_masked_patch_evaluation_refuses_a_checkpoint_without_its_head():
    expected = {"cls": (1, 1, 8), POSEMB_KEY: (1, 17, 8), "encoder/kernel": (8, 8), "mask_embedding": (1, 1, 8),
                "masked_patch_head/kernel": (8, 512), "masked_patch_head/bias": (512,)}
    with pytest.raises(CheckpointError, match=r"^ckpt.npz: cannot be evaluated for masked patch prediction: .*"
                                              r"\(loss ln 512 = 6.24\)"):
        adapt_to_model(_checkpoint(), expected, require_head=True, source="ckpt.npz")
    adapted, actions = adapt_to_model(_checkpoint(), expected)  # pre-training from a classifier: a new head
    assert not adapted["masked_patch_head/kernel"].any() and len(actions) == 2


def test_new_head_shapes():
    head = new_head(8, 3, 0.5)
    assert head["head/kernel"].shape == (8, 3) and not head["head/kernel"].any()
    np.testing.assert_array_equal(head["head/bias"], np.full(3, 0.5, np.float32))
