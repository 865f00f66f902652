"""Logits parity with PyTorch (float32, random weights, random images): HF ViTForImageClassification and timm
VisionTransformer (token and average pooling), loading their files and exporting ours for them to load.

Every torch parameter is perturbed away from its init (unit LayerNorm scales, zero biases and heads would hide
transposed or swapped arrays). The tolerance is the issue's: max abs logit difference < 1e-4.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from tests.test_interop_common import IMAGE_SIZE, logits_of, random_images, random_params, tiny_config
from vit_jax.interop import CheckpointError, detect_format, load_pretrained, save_as
from vit_jax.interop.common import flatten, params_to_canonical

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
NUM_CLASSES = 6
HF_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]  # what an HF export writes


def _perturb(module, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (0.2 if p.ndim < 2 else 0.05))
    return module.eval()


def _torch_logits(module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    diff = float(np.max(np.abs(a - b)))
    print(f"max abs logit diff {diff:.2e}")  # the figure reported with `pytest -s`
    return diff


# ---------------------------------------------------------------------------------------------------- HF


def _hf_model(hidden_act: str = "gelu", layer_norm_eps: float = 1e-12, seed: int = 0, qkv_bias: bool = True):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=IMAGE_SIZE, patch_size=8, num_labels=NUM_CLASSES, hidden_act=hidden_act,
                       layer_norm_eps=layer_norm_eps, qkv_bias=qkv_bias)
    torch.manual_seed(seed)
    return _perturb(ViTForImageClassification(config), seed)


@pytest.mark.parametrize("hidden_act, eps", [("gelu", 1e-12), ("gelu_pytorch_tanh", 1e-6)])
def test_hf_directory_loads_with_logits_parity_and_its_numerics(tmp_path, hidden_act, eps):
    model = _hf_model(hidden_act, eps)
    model.save_pretrained(tmp_path / "hf")
    assert detect_format(str(tmp_path / "hf" / "model.safetensors")) == "hf"
    config = tiny_config()  # tanh GELU, eps 1e-6 until the checkpoint says otherwise
    params = load_pretrained(str(tmp_path / "hf"), config)
    assert config.gelu_approximate == (hidden_act != "gelu") and config.layernorm_epsilon == eps
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _imagenet_normalised(images: np.ndarray) -> np.ndarray:
    """Our [-1, 1] images as a DeiT / DINO / MAE model takes them: (pixels / 255 - mean) / std."""
    return (((images + 1) / 2 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)).astype(np.float32)


def test_an_hf_directory_trained_on_imagenet_normalised_inputs_takes_ours_with_logits_parity(tmp_path, caplog):
    """An HF ViT whose preprocessor_config.json normalises with ImageNet's mean and std (DINO's, e.g.): the
    normalisation folds into the patch embedding, so our [-1, 1] images give the logits HF computes on its own."""
    model = _hf_model(seed=4)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}))
    caplog.set_level(logging.INFO)
    config = tiny_config()
    params = load_pretrained(str(tmp_path / "hf"), config)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "model.safetensors: trained on inputs normalised as its preprocessor_config.json (pixels / 255, mean " \
           "(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) says: folded into the patch embedding" in logged
    images = random_images()
    home = _torch_logits(model, _imagenet_normalised(images))
    assert _max_diff(logits_of(config, params, images), home) < TOLERANCE
    assert _max_diff(logits_of(config, params, _imagenet_normalised(images)), home) > 0.1  # it is folded, not fed


@pytest.mark.parametrize("field, value, message", [
    ("image_std", [0.2, 0.0, 0.2], r"image_std=\[0.2, 0.0, 0.2\] is invalid: expected a positive number or 3 of "
                                   r"them, one per RGB channel"),
    ("image_mean", [0.5, 0.5], r"image_mean=\[0.5, 0.5\] is invalid: expected a number or 3 of them"),
    ("rescale_factor", "1/255", r"rescale_factor='1/255' is invalid: expected a positive number"),
])
def test_an_input_normalisation_that_cannot_be_one_is_refused_naming_the_file(tmp_path, field, value, message):
    _hf_model().save_pretrained(tmp_path / "hf")
    preprocessor = tmp_path / "hf" / "preprocessor_config.json"
    preprocessor.write_text(json.dumps({field: value}))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(preprocessor))}: {message}"):
        load_pretrained(str(tmp_path / "hf"), tiny_config())


def test_hf_in_memory_state_dict_as_bin_loads_through_weights_only(tmp_path):
    """transformers 5's in-memory names (`vit.layers.0.attention.q_proj`), saved with torch.save as a `.bin`."""
    model = _hf_model(seed=1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    config = tiny_config()
    params = load_pretrained(str(path), config)
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


def test_hf_export_loads_in_transformers_with_logits_parity_and_round_trips(tmp_path):
    from transformers import ViTForImageClassification

    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)
    params = random_params(config, NUM_CLASSES, seed=3)
    out = save_as(params, config, str(tmp_path / "hf"), "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == HF_FILES
    model = ViTForImageClassification.from_pretrained(out).eval()
    assert model.config.hidden_act == "gelu" and model.config.layer_norm_eps == 1e-12
    images = random_images()
    ours = logits_of(config, params, images)
    assert _max_diff(ours, _torch_logits(model, images)) < TOLERANCE
    back_config = tiny_config()
    back = load_pretrained(out, back_config)
    for key, value in params_to_canonical(params).items():
        np.testing.assert_array_equal(flatten(back)[key], value, err_msg=key)
    np.testing.assert_array_equal(logits_of(back_config, back, images), ours)


def test_hf_export_classifies_in_transformers_pipeline_as_our_model_does(tmp_path):
    """preprocessor_config.json: HF's image-classification pipeline refused a directory without one (and its
    default processor resizes to 224); with it the pipeline feeds the model our input, the image at the model's
    size in [-1, 1], and its scores are our softmax."""
    from PIL import Image
    from transformers import pipeline

    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)
    params = random_params(config, NUM_CLASSES, seed=3)
    out = save_as(params, config, str(tmp_path / "hf"), "hf")
    pixels = np.random.default_rng(5).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    classify = pipeline("image-classification", model=out, top_k=NUM_CLASSES)
    logits = logits_of(config, params, (pixels / 127.5 - 1).astype(np.float32)).astype(np.float64)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    for image, probabilities in zip(pixels, expected):
        scores = {r["label"]: r["score"] for r in classify(Image.fromarray(image))}
        np.testing.assert_allclose([scores[f"LABEL_{i}"] for i in range(NUM_CLASSES)], probabilities, atol=1e-5)


def test_hf_export_of_a_multi_label_model_says_so_for_hf_to_apply_a_sigmoid(tmp_path):
    """Without problem_type HF's image-classification pipeline reads a sigmoid model's logits through a softmax."""
    from transformers import ViTForImageClassification

    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)
    params = random_params(config, NUM_CLASSES, seed=3)
    multi = save_as(params, config, str(tmp_path / "multi"), "hf", label_kind="multi")
    assert json.loads((tmp_path / "multi" / "config.json").read_text())["problem_type"] == \
        "multi_label_classification"
    assert ViTForImageClassification.from_pretrained(multi).config.problem_type == "multi_label_classification"
    save_as(params, config, str(tmp_path / "single"), "hf", label_kind="single")
    assert "problem_type" not in json.loads((tmp_path / "single" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"^label_kind='sigmoid' is invalid: expected one of \('single', "
                                              r"'multi'\)"):
        save_as(params, config, str(tmp_path / "bad"), "hf", label_kind="sigmoid")
    assert not (tmp_path / "bad").exists()


def test_hf_export_refuses_what_hf_cannot_hold(tmp_path):
    from vit_jax.interop import CheckpointError

    config = tiny_config(classifier="gap")
    with pytest.raises(CheckpointError, match="classifier='gap' cannot be exported to hf"):
        save_as(random_params(config, 3), config, str(tmp_path / "hf"), "hf")



@pytest.mark.parametrize("existing", ["none", "empty"])
def test_a_failed_hf_export_leaves_no_directory_and_no_temporary_one(tmp_path, monkeypatch, existing):
    """A failure between config.json and the weights once left a config-only directory that neither loads nor,
    being non-empty, can be exported into again."""
    from vit_jax.interop import torch_hub

    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)
    params = random_params(config, NUM_CLASSES, seed=2)
    out = tmp_path / "hf"
    if existing == "empty":
        out.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(torch_hub, "write_safetensors", disk_full)
        with pytest.raises(CheckpointError, match=r"hf: cannot write there \(No space left on device\); the "
                                                  "destination is left as it was"):
            save_as(params, config, str(out), "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if existing == "none" else ["hf"])
    assert not out.exists() or not any(out.iterdir())

    assert save_as(params, config, str(out), "hf") == str(out)  # the destination is still usable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in out.iterdir()) == HF_FILES
    loaded = flatten(load_pretrained(str(out), tiny_config()))
    for key, value in params_to_canonical(params).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_hf_export_into_an_occupied_directory_needs_overwrite(tmp_path):
    config = tiny_config()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("model card")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(out))}: exists and is not empty"):
        save_as(random_params(config, NUM_CLASSES), config, str(out), "hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    params = random_params(config, NUM_CLASSES, seed=7)
    save_as(params, config, str(out), "hf", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", *HF_FILES]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    loaded = flatten(load_pretrained(str(out), tiny_config()))
    np.testing.assert_array_equal(loaded["head/kernel"], params_to_canonical(params)["head/kernel"])

# -------------------------------------------------------------------------------------------------- timm


def _timm_model(pooling: str, seed: int = 0, act_layer: str = "gelu", **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    gap = pooling == "avg"
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=kwargs.pop("img_size", IMAGE_SIZE), patch_size=8, embed_dim=64, depth=2,
                              num_heads=4, mlp_ratio=2.0, num_classes=NUM_CLASSES, global_pool=pooling,
                              class_token=kwargs.pop("class_token", not gap), fc_norm=False, act_layer=act_layer,
                              **kwargs)
    return _perturb(model, seed)


@pytest.mark.parametrize("pooling", ["token", "avg"])
def test_timm_safetensors_loads_with_logits_parity(tmp_path, pooling):
    from safetensors.torch import save_file

    model = _timm_model(pooling)
    path = str(tmp_path / "timm.safetensors")
    save_file(model.state_dict(), path)
    assert detect_format(path) == "timm"
    config = tiny_config(classifier="gap" if pooling == "avg" else "token")
    params = load_pretrained(path, config)
    assert config.gelu_approximate is False and config.layernorm_epsilon == 1e-6
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


@pytest.mark.parametrize("variant", [{"no_embed_class": True}, {"qkv_bias": False}],
                         ids=["no_embed_class", "no_qkv_bias"])
def test_timm_variants_this_model_computes_exactly_load_with_logits_parity(tmp_path, variant):
    """no_embed_class (FlexiViT, big_vision ports: a g*g pos_embed beside a cls_token) gets a zero class-token
    slot; qkv_bias=False gets zero q/k/v biases. Both compute what timm computes."""
    from safetensors.torch import save_file

    model = _timm_model("token", seed=6, **variant)
    if "no_embed_class" in variant:
        assert tuple(model.pos_embed.shape) == (1, 16, 64)  # no class-token slot
    else:
        assert model.blocks[0].attn.qkv.bias is None
    path = str(tmp_path / "timm.safetensors")
    save_file(model.state_dict(), path)
    config = tiny_config()
    params = load_pretrained(path, config)
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


def _timm_96x112(tmp_path, config: dict | None) -> str:
    """timm at img_size=(96, 112), patch 8: pos_embed (1, 169, 64), a class-token entry and a 12x14 grid, whose
    count 13*13 reads like a 13x13 grid without the entry. `config`: the timm config.json beside it, if any."""
    from safetensors.torch import save_file

    model = _timm_model("token", seed=8, img_size=(96, 112))
    assert tuple(model.pos_embed.shape) == (1, 169, 64)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), str(path))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_custom_96x112", **config}))
    return str(path)


@pytest.mark.parametrize("config", [
    {"model_args": {"img_size": [96, 112], "patch_size": 8}},
    {"model_args": {"no_embed_class": False}},
    {"pretrained_cfg": {"input_size": [3, 96, 112]}},
], ids=["img_size", "no_embed_class", "input_size"])
def test_a_timm_config_json_tells_a_class_token_entry_whose_count_is_square(tmp_path, config):
    """1 + 12*14 position embeddings once loaded as a 13x13 grid (scrambled) beside a zero class-token slot; the
    config.json says they hold the class token's entry: a 12x14 grid, which a square-grid model cannot load."""
    path = _timm_96x112(tmp_path, config)
    with pytest.raises(CheckpointError, match="168 position embeddings are not a square patch grid"):
        load_pretrained(path, tiny_config())


def test_a_square_count_beside_a_class_token_without_a_config_json_is_read_with_a_warning(tmp_path, caplog):
    import logging

    path = _timm_96x112(tmp_path, None)
    caplog.set_level(logging.WARNING)
    flat = flatten(load_pretrained(path, tiny_config()))
    assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 170, 64)  # the guess: 13x13 + a zero slot
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert (f"{path}: its 169 position embeddings are read as a 13x13 patch grid without a class-token entry "
            "(timm no_embed_class=True); they could also be a class-token entry and 168 patches (e.g. a 12x14 "
            "grid)") in logged
    assert "put the timm config.json beside the file (model_args.no_embed_class, or img_size and patch_size)" in logged


def test_a_timm_config_json_tells_a_no_embed_class_model_with_logits_parity(tmp_path, caplog):
    """A config.json that says no_embed_class (by name or by the image size) decides it: no warning."""
    import logging

    from safetensors.torch import save_file

    model = _timm_model("token", seed=6, no_embed_class=True)
    path = str(tmp_path / "timm.safetensors")
    save_file(model.state_dict(), path)
    images = random_images()
    for args in ({"no_embed_class": True}, {"img_size": IMAGE_SIZE}):
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_custom", "model_args": args}))
        caplog.clear()
        caplog.set_level(logging.WARNING)
        config = tiny_config()
        params = load_pretrained(path, config)
        assert not [r for r in caplog.records if "position embeddings" in r.getMessage()]
        assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


def test_hf_without_qkv_bias_loads_with_logits_parity(tmp_path):
    model = _hf_model(seed=4, qkv_bias=False)
    names = list(model.state_dict())
    assert any(n.endswith(("query.weight", "q_proj.weight")) for n in names)
    assert not any(n.endswith(("query.bias", "q_proj.bias", "key.bias", "k_proj.bias")) for n in names)
    model.save_pretrained(tmp_path / "hf")
    config = tiny_config()
    params = load_pretrained(str(tmp_path / "hf"), config)
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


def _timm_training_checkpoint(model, **extra) -> dict:
    """What timm's train script saves (`CheckpointSaver`): the DDP-prefixed state_dict beside the optimizer state,
    epoch, arch, version and metric; `extra` adds what it also pickles (its argparse `args`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).sum().backward()
    optimizer.step()
    return {"epoch": 3, "arch": "vit_custom", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "version": 2, "metric": 71.5, **extra}


def test_timm_pth_training_checkpoint_loads(tmp_path):
    """A timm training checkpoint without pickled Python objects (e.g. saved without args) loads, weights_only."""
    model = _timm_model("token", seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(_timm_training_checkpoint(model), path)
    config = tiny_config()
    params = load_pretrained(str(path), config)
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model.eval(), images)) < TOLERANCE


def test_timm_training_checkpoint_with_argparse_args_is_refused_saying_why_and_what_to_do(tmp_path):
    """model_best.pth.tar pickles its argparse.Namespace: refused with torch's "Unsupported global" line (not its
    generic first line with terminal colour codes) and how to get a weights-only file."""
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save(_timm_training_checkpoint(_timm_model("token", seed=2), args=argparse.Namespace(lr=0.1)), path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(path), tiny_config())
    message = str(e.value)
    assert message.startswith(f"{path}: not a readable torch weights file (torch.load with weights_only=True "
                              "refuses it: Unsupported global: GLOBAL argparse.Namespace was not an allowed global")
    assert "save only its state_dict (timm's clean_checkpoint.py" in message and "safetensors" in message
    assert "\x1b" not in message and "Weights only load failed" not in message


@pytest.mark.parametrize("pooling, gelu_approximate", [("token", False), ("avg", False), ("token", True)])
def test_timm_export_loads_in_timm_with_logits_parity_and_round_trips(tmp_path, pooling, gelu_approximate):
    """A tanh-GELU model (e.g. from an official .npz) loads in timm with act_layer='gelu_tanh'."""
    from timm.models import load_checkpoint

    config = tiny_config(classifier="gap" if pooling == "avg" else "token", gelu_approximate=gelu_approximate)
    params = random_params(config, NUM_CLASSES, seed=4)
    path = str(tmp_path / "vit.safetensors")
    save_as(params, config, path, "timm")
    # Different weights, all replaced by the file's.
    model = _timm_model(pooling, seed=9, act_layer="gelu_tanh" if gelu_approximate else "gelu")
    load_checkpoint(model, path, strict=True)
    images = random_images()
    ours = logits_of(config, params, images)
    assert _max_diff(ours, _torch_logits(model.eval(), images)) < TOLERANCE
    back_config = tiny_config(classifier=config.classifier, gelu_approximate=not gelu_approximate)
    back = load_pretrained(path, back_config)
    assert back_config.gelu_approximate == gelu_approximate  # recorded in the file's metadata
    np.testing.assert_array_equal(logits_of(back_config, back, images), ours)


@pytest.mark.parametrize("pooling, gelu_approximate", [("token", True), ("avg", False)])
def test_the_timm_call_the_export_logs_loads_the_files_head(tmp_path, caplog, pooling, gelu_approximate):
    """The logged `timm.create_model(...)`, run as printed: without the overlay's num_classes timm took the file
    for the registered model's 1000 classes and, for any other count, loaded it with a random head."""
    import timm

    config = tiny_config(classifier="gap" if pooling == "avg" else "token", gelu_approximate=gelu_approximate)
    params = random_params(config, NUM_CLASSES, seed=5)
    path = str(tmp_path / "vit.safetensors")
    caplog.set_level(logging.INFO)
    save_as(params, config, path, "timm")
    [call] = [m.split("timm: ", 1)[1] for m in (r.getMessage() for r in caplog.records) if m.startswith("timm: ")]
    assert call.startswith("timm.create_model(<vit name>, pretrained=True, num_classes=6, img_size=32, ")
    # <vit name>: a registered ViT, with the tiny model's architecture.
    name = "'vit_tiny_patch16_224', patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0"
    model = eval(call.replace("<vit name>", name), {"timm": timm})  # the logged call, as a user would paste it
    data = timm.data.resolve_data_config({}, model=model)
    assert data["mean"] == data["std"] == (0.5, 0.5, 0.5) and data["input_size"] == (3, 32, 32)  # our [-1, 1]
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model.eval(), images)) < TOLERANCE


def _timm_hub_download(tmp_path, model, config: dict) -> str:
    """A timm hub download directory: model.safetensors (no metadata of ours) + timm's config.json."""
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(model.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"num_classes": NUM_CLASSES, "pretrained_cfg": {}, **config}))
    return str(hub)


def test_a_timm_download_trained_on_imagenet_normalised_inputs_takes_ours_with_logits_parity(tmp_path):
    """A timm hub download whose pretrained_cfg says ImageNet's mean and std (DeiT, DINO, MAE): folded into the
    patch embedding (without, such weights saw the wrong inputs in silence); ours exported again say [-1, 1]."""
    model = _timm_model("token", seed=3)
    hub = _timm_hub_download(tmp_path, model, {"architecture": "vit_tiny_patch16_224", "model_args": {
        "num_heads": 4}, "pretrained_cfg": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}})
    config = tiny_config(gelu_approximate=False)
    params = load_pretrained(hub, config)
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, _imagenet_normalised(images))) < \
        TOLERANCE
    save_as(params, config, str(tmp_path / "hf"), "hf")  # its preprocessor_config.json: our [-1, 1]
    np.testing.assert_array_equal(flatten(load_pretrained(str(tmp_path / "hf"), tiny_config()))["embedding/kernel"],
                                  params["embedding"]["kernel"])


def test_a_timm_class_token_model_that_pools_its_patches_is_refused_as_its_config_json_says(tmp_path):
    """class_token=True, global_pool='avg', fc_norm=False has a class-token model's keys: it loaded as one, its
    logits off by the pooling (1.8 at a logit scale of 2.5 in the review)."""
    model = _timm_model("avg", seed=2, class_token=True)
    hub = _timm_hub_download(tmp_path, model, {"architecture": "vit_tiny_patch16_224", "model_args": {
        "num_heads": 4, "class_token": True, "global_pool": "avg"}})
    with pytest.raises(CheckpointError, match=r"model.safetensors: a timm model with a class token whose head reads "
                                              r"the patches pooled \(global_pool='avg', as .*config.json says\)"):
        load_pretrained(hub, tiny_config())
    config = tiny_config()  # the same weights said to classify the class token: read as such
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                              "model_args": {"num_heads": 4}}))
    load_pretrained(hub, config)


def test_a_timm_siglip_gap_download_loads_with_the_tanh_gelu_of_its_architecture(tmp_path):
    """timm builds vit_base_patch32_siglip_gap_256 with act_layer='gelu_tanh'; it loaded with exact GELU."""
    model = _timm_model("avg", seed=8, act_layer="gelu_tanh")
    hub = _timm_hub_download(tmp_path, model, {"architecture": "vit_base_patch32_siglip_gap_256",
                                               "model_args": {"num_heads": 4}})
    config = tiny_config(classifier="gap", gelu_approximate=False)
    params = load_pretrained(hub, config)
    assert config.gelu_approximate is True and config.layernorm_epsilon == 1e-6
    images = random_images()
    assert _max_diff(logits_of(config, params, images), _torch_logits(model, images)) < TOLERANCE


def test_the_head_count_of_a_timm_architecture_is_checked(tmp_path):
    hub = _timm_hub_download(tmp_path, _timm_model("token"), {"architecture": "vit_tiny_patch16_224"})
    with pytest.raises(CheckpointError, match=r"config.json: timm architecture 'vit_tiny_patch16_224' num_heads=3 "
                                              r"but the model config has num_heads=4"):
        load_pretrained(hub, tiny_config())


def test_source_numerics_without_loading(tmp_path):
    from safetensors.torch import save_file

    from vit_jax.interop import apply_source_numerics

    _hf_model("gelu_pytorch_tanh", 1e-5).save_pretrained(tmp_path / "hf")
    config = tiny_config(gelu_approximate=False)
    assert apply_source_numerics(str(tmp_path / "hf"), config).layernorm_epsilon == 1e-5
    assert config.gelu_approximate is True and config.layernorm_epsilon == 1e-5
    save_file(_timm_model("token").state_dict(), str(tmp_path / "timm.safetensors"))
    apply_source_numerics(str(tmp_path / "timm.safetensors"), config)
    assert config.gelu_approximate is False and config.layernorm_epsilon == 1e-6


def test_numerics_of_safetensors_come_from_key_names_without_reading_tensors(tmp_path, monkeypatch):
    """timm vs HF is told from the safetensors header: reading the weights here raises, and the answer is right."""
    from safetensors.torch import save_file

    from vit_jax.interop import torch_hub
    from vit_jax.interop.common import TIMM_NUMERICS
    from vit_jax.interop.loading import source_numerics

    save_file(_timm_model("token").state_dict(), str(tmp_path / "timm.safetensors"))
    (tmp_path / "hf").mkdir()
    save_file(_hf_model().state_dict(), str(tmp_path / "hf" / "weights.safetensors"))  # no config.json beside

    def no_full_read(path, *args):
        raise AssertionError(f"read every tensor of {path}")

    monkeypatch.setattr(torch_hub, "read_state_dict", no_full_read)
    monkeypatch.setattr(torch_hub, "_read_safetensors", no_full_read)
    assert source_numerics(str(tmp_path / "timm.safetensors")) == TIMM_NUMERICS
    hf = source_numerics(str(tmp_path / "hf" / "weights.safetensors"))
    assert (hf.gelu_approximate, hf.layernorm_epsilon) == (False, 1e-12)
    assert detect_format(str(tmp_path / "hf" / "weights.safetensors")) == "hf"


def test_timm_checkpoint_at_another_resolution_and_class_count(tmp_path):
    """Surgery on a timm file: 4x4 -> 6x6 posemb (class token kept), a new zero 3-class head."""
    from safetensors.torch import save_file

    model = _timm_model("token", seed=5)
    path = str(tmp_path / "timm.safetensors")
    save_file(model.state_dict(), path)
    config = tiny_config()
    flat = flatten(load_pretrained(path, config, num_classes=3, image_size=48, resize_method="bicubic"))
    pos_embed = model.pos_embed.detach().numpy()
    np.testing.assert_array_equal(flat["Transformer/posembed_input/pos_embedding"][:, :1], pos_embed[:, :1])
    # timm's own resize as the independent reference (torch's bicubic, a=-0.75; without antialiasing, which
    # timm turns on by default and which switches torch to PIL's a=-0.5 kernel).
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(torch.from_numpy(pos_embed), (6, 6), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False).numpy()
    np.testing.assert_allclose(flat["Transformer/posembed_input/pos_embedding"], expected, atol=1e-5)
    assert flat["head/kernel"].shape == (64, 3) and not flat["head/kernel"].any()


def _timm_with_pre_logits(tmp_path, seed: int = 7) -> tuple:
    """A timm < 0.6 representation-layer file (`jx_vit_*_in21k-*.pth`): `pre_logits.fc` (Linear, then tanh) between
    the class token and the head. Returns (path, model, fc weight, fc bias)."""
    model = _timm_model("token", seed=seed)
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 0.1, (64, 64)).astype(np.float32)
    bias = rng.normal(0.0, 0.2, (64,)).astype(np.float32)
    state = {**model.state_dict(), "pre_logits.fc.weight": torch.from_numpy(weight),
             "pre_logits.fc.bias": torch.from_numpy(bias)}
    path = tmp_path / "jx_vit_tiny_in21k.pth"
    torch.save(state, path)
    return str(path), model, weight, bias


def test_timm_pre_logits_fc_loads_as_pre_logits_with_logits_parity(tmp_path):
    """Released in21k timm files hold `pre_logits.fc`: it was refused as 2 unexpected keys whatever the config."""
    path, model, weight, bias = _timm_with_pre_logits(tmp_path)
    config = tiny_config(representation_size=64)
    params = load_pretrained(path, config)
    flat = flatten(params)
    np.testing.assert_array_equal(flat["pre_logits/kernel"], weight.T)
    np.testing.assert_array_equal(flat["pre_logits/bias"], bias)
    images = random_images()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))),
                                    pre_logits=True).numpy()
    head_w, head_b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    expected = np.tanh(pooled @ weight.T + bias) @ head_w.T + head_b
    assert _max_diff(logits_of(config, params, images), expected) < TOLERANCE


def test_timm_pre_logits_fc_is_dropped_for_representation_size_0(tmp_path, caplog):
    import logging

    path, _, _, _ = _timm_with_pre_logits(tmp_path)
    caplog.set_level(logging.INFO)
    flat = flatten(load_pretrained(path, tiny_config(representation_size=0)))
    assert not any(key.startswith("pre_logits") for key in flat)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped pre_logits (64 units): the model has representation_size=0" in logged


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 8}, r"num_attention_heads=8 but the model config has num_heads=4"),
    ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported; valid: \['gelu', "),
])
def test_hf_directories_whose_config_the_model_cannot_follow_are_refused(tmp_path, change, message):
    """8 heads of width 8 hold the same arrays as 4 of 16: only config.json tells them apart, so it is read."""
    _hf_model().save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=f"^{cfg_path}: {message}"):
        load_pretrained(str(tmp_path / "hf"), tiny_config())


def test_timm_models_this_model_cannot_compute_are_refused(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    fc_norm = VisionTransformer(img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                                num_classes=NUM_CLASSES, global_pool="avg", class_token=False, fc_norm=True)
    path = str(tmp_path / "fc_norm.safetensors")
    save_file(fc_norm.state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: timm model with fc_norm \(LayerNorm after pooling\)"):
        load_pretrained(path, tiny_config(classifier="gap"))

    hybrid = {"patch_embed.backbone.stem.conv.weight": torch.zeros(64, 3, 7, 7),
              **{k: v for k, v in _timm_model("token").state_dict().items() if not k.startswith("patch_embed.")}}
    path = str(tmp_path / "hybrid.safetensors")
    save_file(hybrid, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: a timm hybrid \(ResNetV2 backbone"):
        load_pretrained(path, tiny_config())


def test_bfloat16_safetensors_are_read_through_torch(tmp_path):
    """numpy has no bfloat16: such a file is read through torch, to float32 values equal to the bf16 ones."""
    from safetensors.torch import save_file

    model = _timm_model("token", seed=3)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = str(tmp_path / "bf16.safetensors")
    save_file(state, path)
    params = flatten(load_pretrained(path, tiny_config()))
    np.testing.assert_array_equal(params["cls"].reshape(-1), state["cls_token"].float().numpy().reshape(-1))
    np.testing.assert_array_equal(params["head/bias"], state["head.bias"].float().numpy())
