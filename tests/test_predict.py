"""`vit_jax.predict`: labels of a briefly trained digits model, eval preprocessing, per-file errors, the CLI."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import train_helpers
from vit_jax import predict
from vit_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = 300  # the tiny model reaches a training loss of ~0.1 on digits: it knows its training images
NUM_IMAGES = 20
_TRAINED: dict = {}


def digits_config(tfds_data_dir):
    """The tiny model of train_helpers on the embedded digits, as predict and visualize tests use it."""
    return train_helpers.tiny_config(**{
        "dataset": "digits", "train_split": "train", "eval_split": "test", "tfds_data_dir": str(tfds_data_dir),
        "total_steps": TRAIN_STEPS, "batch_size": 64, "eval_batch_size": 128, "log_every": 100,
        "eval_every": 100_000, "checkpoint_every": 100_000, "optimizer.name": "adam", "optimizer.lr": 3e-3,
        "optimizer.warmup_steps": 20, "pp.inception_crop": False, "pp.flip": False})


def config_flags(config):
    """The command-line flags that give the CLI `config` (on top of configs/common.py:Ti/16)."""
    m = config.model
    return ["--config=configs/common.py:Ti/16", "--config.model.variant=custom",
            f"--config.model.hidden_size={m.hidden_size}", f"--config.model.num_layers={m.num_layers}",
            f"--config.model.num_heads={m.num_heads}", f"--config.model.mlp_dim={m.mlp_dim}",
            f"--config.model.patch_size={m.patch_size}", f"--config.image_size={config.image_size}",
            f"--config.num_classes={config.num_classes}", f"--config.dataset={config.dataset}",
            f"--config.train_split={config.train_split}", f"--config.eval_split={config.eval_split}",
            f"--config.tfds_data_dir={config.tfds_data_dir}"]


def train_digits_once(tmp_path_factory):
    """(config, workdir, images dir) of a tiny digits model trained once per test run (~300 CPU steps).

    The images dir holds the first NUM_IMAGES training digits as the dataset stores them (8x8 grey PNG),
    named `train_<i>_label<l>.png`. Session fixtures here and in tests/test_visualize.py share the run, also
    across xdist workers (the run's shared temporary directory, under a file lock; a marker says it is whole):
    when the two files landed on different workers each trained it (~30 s each).
    """
    if "run" not in _TRAINED:
        import filelock

        root = train_helpers.run_shared_dir(tmp_path_factory) / "trained_digits"
        config = digits_config(root / "tfds")
        with filelock.FileLock(f"{root}.lock"):
            if not (root / "trained").exists():
                from vit_jax import train
                from vit_jax.data import datasets

                shutil.rmtree(root, ignore_errors=True)  # a worker that died part-way
                result = train.train_and_evaluate(config, str(root / "workdir"))
                assert result["step"] == TRAIN_STEPS
                source, _ = datasets.open_split(config, "train")
                (root / "images").mkdir()
                for i in range(NUM_IMAGES):
                    example = source[i]
                    (root / "images" / f"train_{i:02d}_label{int(example['label'])}.png").write_bytes(
                        example["image"])
                (root / "trained").touch()
        _TRAINED["run"] = (config, root / "workdir", root / "images")
    return _TRAINED["run"]


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    return train_digits_once(tmp_path_factory)


def label_of(path):
    return int(pathlib.Path(path).stem.rsplit("label", 1)[1])


def run_cli(*args):
    # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of the command (vit_jax.hugepages, tested in test_hugepages.py).
    return subprocess.run([sys.executable, "-m", "vit_jax.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VIT_JAX_HUGEPAGES": "0"})


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_labels_training_images_and_reports_a_text_file_without_stopping(trained_digits, tmp_path):
    from vit_jax.data import preprocess

    config, workdir, images_dir = trained_digits
    images = sorted(str(p) for p in images_dir.iterdir())
    (tmp_path / "notes.txt").write_text("these are not pixels\n")
    # More paths than one batch of images (decoded and classified a batch at a time), the text file in the first.
    images = images + images
    assert len(images) + 1 > predict.BATCH_SIZE
    args = images[:5] + [str(tmp_path / "notes.txt")] + images[5:]
    result = run_cli(*config_flags(config), f"--checkpoint={workdir}", "--json", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 2, result.stderr[-3000:]
    assert "notes.txt" in errors[0] and "not an image" in errors[0] and "0x" not in errors[0]
    assert f"1 of {len(args)} images could not be read" in errors[1]

    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == images  # every other image, in order
    correct = 0
    for record in records:
        top = record["top_k"]
        assert [entry["label"] for entry in top] == [str(entry["index"]) for entry in top]  # digits: "0".."9"
        assert len({entry["index"] for entry in top}) == 5
        probs = [entry["prob"] for entry in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        correct += top[0]["index"] == label_of(record["image"])
    assert correct >= 2 * NUM_IMAGES - 2, records

    # The probabilities are those of the eval pipeline's preprocessing (an independent path to the pixels).
    params, num_classes = predict.load_params(str(workdir), config.copy_and_resolve_references())
    evaluate = preprocess.EvalPreprocess(config.image_size, config.num_classes, config.pp.eval_crop_fraction)
    pixels = np.stack([preprocess.to_unit_range(evaluate({"image": pathlib.Path(p).read_bytes(), "label": 0,
                                                          "index": 0})["image"]) for p in images])
    probs = np.asarray(predict.make_classifier(config.model, num_classes)(params, pixels))
    for record, expected in zip(records, probs):
        got = {entry["index"]: entry["prob"] for entry in record["top_k"]}
        np.testing.assert_allclose([expected[i] for i in got], list(got.values()), rtol=1e-4, atol=1e-6)
        assert set(got) == set(np.argsort(-expected)[:5])


def test_cli_text_output_for_a_large_jpeg_from_the_checkpoints_dir(trained_digits, tmp_path):
    config, workdir, images_dir = trained_digits
    small = sorted(images_dir.iterdir())[0]
    with Image.open(small) as image:  # the 8x8 digit as a 120x90 RGB JPEG: any size and format is resized
        image.convert("RGB").resize((120, 90), Image.Resampling.BILINEAR).save(tmp_path / "big.jpg", quality=95)
    result = run_cli(*config_flags(config), f"--checkpoint={workdir / 'checkpoints'}", "--top_k=3",
                     str(tmp_path / "big.jpg"), str(small))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 8 and lines[0] == str(tmp_path / "big.jpg") and lines[4] == str(small)
    rows = [line.split() for line in lines[1:4] + lines[5:8]]
    assert all(len(row) == 2 and row[0].endswith("%") for row in rows)
    assert rows[0][1] == rows[3][1] == str(label_of(small))  # the big JPEG is read as the digit it shows


def test_dataset_label_names_come_from_the_prepared_dataset(trained_digits):
    config = trained_digits[0]
    assert predict.dataset_label_names(config, 10) == [str(i) for i in range(10)]
    assert predict.dataset_label_names(config, 7) is None  # a head of another size: indices stand in


def test_read_image_matches_eval_preprocessing_for_any_size(tmp_path):
    from vit_jax.data import preprocess

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    antialiased = predict.read_image(tmp_path / "odd.png", 16, crop_fraction=0.875, antialias=True)
    reference = Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR,
                                               box=(53 * 0.0625, 37 * 0.0625, 53 * 0.9375, 37 * 0.9375))
    assert antialiased.shape == (16, 16, 3) and antialiased.dtype == np.float32
    np.testing.assert_allclose(antialiased, np.asarray(reference, np.float32) / 127.5 - 1, atol=1e-5)
    example = {"image": (tmp_path / "odd.png").read_bytes(), "label": 0, "index": 0}
    for antialias in (False, True):  # the eval pipeline's pixels, with either resize
        image = predict.read_image(tmp_path / "odd.png", 16, crop_fraction=0.875, antialias=antialias)
        evaluated = preprocess.EvalPreprocess(16, 1, 0.875, antialias=antialias)(example)["image"]
        np.testing.assert_array_equal(image, preprocess.to_unit_range(evaluated))


def test_read_image_resizes_to_image_size_and_scales_to_unit_range(tmp_path):
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[..., 0] = 255  # pure red, any size: resizing keeps it red
    pixels[..., 2] = 51
    Image.fromarray(pixels).save(tmp_path / "red.png")
    image = predict.read_image(tmp_path / "red.png", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(image[..., 1], -1.0, atol=1e-6)
    np.testing.assert_allclose(image[..., 2], 51 / 127.5 - 1, atol=1e-6)


def test_read_image_crops_the_centre_with_eval_crop_fraction(tmp_path):
    pixels = np.zeros((20, 20), np.uint8)
    pixels[5:15, 5:15] = 255  # white centre half, black border
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "centre.png")
    image = predict.read_image(tmp_path / "centre.png", 10, crop_fraction=0.5)
    assert image.shape == (10, 10, 3)
    np.testing.assert_allclose(image, 1.0, atol=1e-6)  # only the white centre is left
    np.testing.assert_allclose(predict.read_image(tmp_path / "centre.png", 20)[0, 0], -1.0, atol=1e-6)


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:60])  # a truncated PNG
    with pytest.raises(UserError, match=r"notes\.txt: not an image file"):
        predict.read_image(tmp_path / "notes.txt", 16)
    with pytest.raises(UserError, match=r"cut\.png: not an image file"):
        predict.read_image(tmp_path / "cut.png", 16)
    with pytest.raises(UserError, match=r"missing\.jpg: no such file"):
        predict.read_image(tmp_path / "missing.jpg", 16)
    with pytest.raises(UserError, match=r"is a directory; pass image files"):
        predict.read_image(tmp_path, 16)


def test_top_k_orders_by_probability_and_names_the_classes():
    probs = np.array([0.1, 0.4, 0.05, 0.4, 0.05])
    assert predict.top_k(probs, 3, list("abcde")) == [
        {"label": "b", "index": 1, "prob": 0.4}, {"label": "d", "index": 3, "prob": 0.4},
        {"label": "a", "index": 0, "prob": 0.1}]
    assert [entry["label"] for entry in predict.top_k(probs, 2)] == ["1", "3"]
    # Sigmoids of logits 20 and 30 are both 1.0 in float32: the logits rank them.
    logits = np.array([20.0, 30.0, 5.0], np.float32)
    saturated = 1 / (1 + np.exp(-logits))
    assert saturated[0] == saturated[1] == 1.0
    assert [entry["index"] for entry in predict.top_k(saturated, 3, logits=logits)] == [1, 0, 2]


def test_labels_file_must_name_every_class(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    assert predict.read_labels_file(str(tmp_path / "labels.txt"), 2) == ["cat", "dog"]
    (tmp_path / "notepad.txt").write_bytes("cat\r\ndog\r\n".encode("utf-8-sig"))  # a byte-order mark first
    assert predict.read_labels_file(str(tmp_path / "notepad.txt"), 2) == ["cat", "dog"]
    with pytest.raises(UserError, match="has 2 names.*3 classes"):
        predict.read_labels_file(str(tmp_path / "labels.txt"), 3)
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")  # class 1 was named '' and dog became class 2
    with pytest.raises(UserError, match=r"gap.txt: line 2 is blank: give one name per line, class 0 first"):
        predict.read_labels_file(str(tmp_path / "gap.txt"), 3)


def test_predict_batches_give_the_same_probabilities_as_one_pass():
    import flax.linen as nn
    import jax

    from vit_jax.models.vit import build_model

    config = train_helpers.tiny_config()
    model = build_model(config.model, config.num_classes)
    images = np.random.default_rng(1).uniform(-1, 1, (predict.BATCH_SIZE + 3, 16, 16, 3)).astype(np.float32)
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"])(images[:1])
    # The initial head is zero (every logit 0, every probability 1/10): noise makes each image's row its own.
    noise = np.random.default_rng(4)
    params = jax.tree.map(lambda x: (np.asarray(x) + 0.3 * noise.normal(size=np.shape(x))).astype(np.float32),
                          nn.unbox(params))
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images), np.float64)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    predictions = predict.predict(config, params, [(str(i), image) for i, image in enumerate(images)], k=10)
    assert [p.image for p in predictions] == [str(i) for i in range(len(images))]
    for prediction, row in zip(predictions, expected):
        got = {entry["index"]: entry["prob"] for entry in prediction.top_k}
        assert sorted(got) == list(range(10))
        np.testing.assert_allclose([got[i] for i in range(10)], row, rtol=1e-4, atol=1e-6)
    assert np.ptp(expected[:, 0]) > 0.01 and len({int(i) for i in expected.argmax(-1)}) > 1  # rows differ


def test_a_checkpoint_trained_with_sigmoids_predicts_sigmoids_whatever_the_config_says(tmp_path, caplog):
    import flax.linen as nn
    import jax

    from vit_jax.interop import orbax_io
    from vit_jax.models.vit import build_model

    config = train_helpers.tiny_config()
    model = build_model(config.model, config.num_classes)
    images = np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"])(images[:1])
    params = jax.tree.map(lambda x: np.asarray(x) + np.random.default_rng(3).normal(0, 0.5, np.shape(x)),
                          nn.unbox(params))
    recorded = {"label_kind": "multi", "model": config.model.to_dict()}
    orbax_io.write_orbax(params, {"step": 7, "config": json.dumps(recorded)}, str(tmp_path / "ckpt"))
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images), np.float64)

    assert config.label_kind == "single"
    predict.follow_recorded_run(config, str(tmp_path / "ckpt"))
    assert config.label_kind == "multi" and "trained with label_kind='multi'" in caplog.text
    loaded, _ = predict.load_params(str(tmp_path / "ckpt"), config)
    predictions = predict.predict(config, loaded, [(str(i), image) for i, image in enumerate(images)], k=10)
    for prediction, row in zip(predictions, logits):
        got = {entry["index"]: entry["prob"] for entry in prediction.top_k}
        np.testing.assert_allclose([got[i] for i in range(10)], 1 / (1 + np.exp(-row)), rtol=1e-4, atol=1e-6)
    # A checkpoint of another format records no run: the config's kind stays.
    np.savez(tmp_path / "weights.npz", x=np.zeros(2))
    config.label_kind = "single"
    predict.follow_recorded_run(config, str(tmp_path / "weights.npz"))
    assert config.label_kind == "single"


def _orbax_checkpoint(path, config, recorded):
    """A tiny model's params at config.image_size, written as an orbax checkpoint whose run recorded `recorded`."""
    import flax.linen as nn
    import jax

    from vit_jax.interop import orbax_io
    from vit_jax.models.vit import build_model

    model = build_model(config.model, config.num_classes)
    images = np.zeros((1, config.image_size, config.image_size, 3), np.float32)
    params = nn.unbox(jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"])(images))
    orbax_io.write_orbax(params, {"step": 7, "config": json.dumps(recorded)}, str(path))
    return params


def test_preprocessing_other_than_the_runs_is_one_warning_each_and_is_kept(tmp_path, caplog):
    """predict once ignored the recorded image_size, pp.eval_crop_fraction and pp.antialias without a word."""
    import logging

    config = train_helpers.tiny_config()
    recorded = {"label_kind": "single", "image_size": 32, "model": config.model.to_dict(),
                "pp": {"eval_crop_fraction": 0.875, "antialias": True}}
    _orbax_checkpoint(tmp_path / "ckpt", train_helpers.tiny_config(image_size=32), recorded)
    caplog.set_level(logging.WARNING, logger="absl")  # as predict logs
    predict.follow_recorded_run(config, str(tmp_path / "ckpt"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert "evaluated with image_size=32, this config has 16; pass --config.image_size=32" in warnings[0]
    assert ("evaluated with pp.eval_crop_fraction=0.875, this config has 1.0; pass "
            "--config.pp.eval_crop_fraction=0.875") in warnings[1]
    assert "evaluated with pp.antialias=True, this config has False; pass --config.pp.antialias=True" in warnings[2]
    assert (config.image_size, config.pp.eval_crop_fraction, config.pp.antialias) == (16, 1.0, False)
    # The run's own settings, or a run that recorded none of them: nothing to say.
    caplog.clear()
    same = train_helpers.tiny_config(image_size=32, **{"pp.eval_crop_fraction": 0.875, "pp.antialias": True})
    predict.follow_recorded_run(same, str(tmp_path / "ckpt"))
    assert predict.recorded_preprocessing_differences(config, {"label_kind": "single"}) == []
    assert not caplog.records


def test_resizing_the_position_embeddings_is_a_warning_and_loads_what_load_pretrained_loads(tmp_path, caplog):
    """The resize was logged at INFO only, which predict silences: a 16px model at 32px classified without a word."""
    import logging

    from vit_jax.interop import load_pretrained

    config = train_helpers.tiny_config()
    _orbax_checkpoint(tmp_path / "ckpt", config, {"model": config.model.to_dict()})
    at_32 = train_helpers.tiny_config(image_size=32)
    caplog.set_level(logging.WARNING, logger="absl")  # as predict logs
    params, _ = predict.load_params(str(tmp_path / "ckpt"), at_32)
    assert ("resized its position embeddings from the 4x4 patch grid (16px, as it was trained) to 8x8 for "
            "config.image_size=32; --config.image_size=16 classifies at its own resolution") in caplog.text
    expected = load_pretrained(str(tmp_path / "ckpt"), at_32.model, image_size=32)
    np.testing.assert_array_equal(params["Transformer"]["posembed_input"]["pos_embedding"],
                                  expected["Transformer"]["posembed_input"]["pos_embedding"])
    caplog.clear()
    predict.load_params(str(tmp_path / "ckpt"), config)  # its own resolution: nothing to say
    assert "resized" not in caplog.text


def test_cli_without_images_is_a_one_line_error(tmp_path):
    result = run_cli("--config=configs/demo.py", f"--checkpoint={tmp_path}")
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: no IMAGE given: pass one or more image files after the flags"]
    # A misspelt label kind was read as a softmax.
    result = run_cli("--config=configs/demo.py", "--config.label_kind=mutli", f"--checkpoint={tmp_path}", "x.png")
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: config.label_kind='mutli' is invalid: expected one of "
                                          "('single', 'multi')"]


def test_cast_for_inference_casts_the_matmul_kernels_and_keeps_the_probabilities_bitwise():
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from vit_jax.models.vit import build_model

    config = train_helpers.tiny_config(**{"model.dtype": "bfloat16"})
    model = build_model(config.model, config.num_classes)
    images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"])(images[:1])
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
    cast = predict.cast_for_inference(params, "bfloat16")
    dtypes = {"/".join(path): value.dtype for path, value in traverse_util.flatten_dict(cast).items()}
    assert dtypes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == jnp.bfloat16
    assert dtypes["embedding/kernel"] == jnp.bfloat16
    assert dtypes["head/kernel"] == jnp.float32  # the head computes in float32
    assert dtypes["Transformer/encoderblock_0/LayerNorm_0/scale"] == jnp.float32  # LayerNorm computes in float32
    assert dtypes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"] == jnp.float32
    classify = predict.make_classifier(config.model, config.num_classes)
    np.testing.assert_array_equal(np.asarray(classify(cast, images)), np.asarray(classify(params, images)))
    unchanged = predict.cast_for_inference(params, "float32")  # float32: nothing to cast
    assert all(a is b for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(params)))
