"""`vit_jax.visualize`: image loading, the PNGs it draws (files and pixel sizes), and the command line."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from tests.test_analysis import random_params, tiny_model_config
from tests.test_predict import config_flags, train_digits_once
from vit_jax import analysis, visualize
from vit_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_run_config(**model_overrides):
    config = common.get_config("Ti/16")
    config.model = tiny_model_config(**model_overrides)
    config.image_size, config.num_classes = 16, 5
    return config


def png_size(path):
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_sample_images_are_preprocessed_photos():
    images = visualize.sample_images(32)
    assert [name for name, _ in images] == list(visualize.SAMPLE_IMAGES)
    for _, image in images:
        assert image.shape == (32, 32, 3) and -1.0 <= image.min() < image.max() <= 1.0


def test_render_figures_writes_every_png_at_its_size(tmp_path):
    config = tiny_run_config()
    images = [("a", np.full((16, 16, 3), 0.5, np.float32)), ("a", visualize.sample_images(16)[0][1])]
    written = visualize.render_figures(config, random_params(config.model), images, tmp_path / "out",
                                       num_components=28)
    names = sorted(path.name for path in written)
    assert names == ["attention_distance.png", "embedding_filters.png", "position_embedding_similarity.png",
                     "rollout_00_a.png", "rollout_01_a.png"]
    expected = {"attention_distance.png": visualize.DISTANCE_SIZE, "embedding_filters.png": visualize.FILTERS_SIZE,
                "position_embedding_similarity.png": visualize.SIMILARITY_SIZE,
                "rollout_00_a.png": visualize.ROLLOUT_SIZE, "rollout_01_a.png": visualize.ROLLOUT_SIZE}
    for path in written:
        assert png_size(path) == visualize.figure_pixels(expected[path.name])
    assert visualize.figure_pixels(visualize.ROLLOUT_SIZE) == (900, 320)
    # The figures are drawn, not blank: the rollout PNG holds many colours.
    with Image.open(tmp_path / "out" / "rollout_01_a.png") as image:
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 100


@pytest.mark.parametrize("names, expected", [
    (["a", "a", "01_a"], ["00_a", "04_a", "01_a"]),  # a number that would repeat another image's name
    (["Cat", "cat", "x"], ["00_Cat", "01_cat", "x"]),  # one file where the file system ignores case
    (["a b", "a?b", "c"], ["00_a_b", "01_a_b", "c"]),
    (["", "d"], ["image", "d"]),
])
def test_rollout_file_names_are_distinct(names, expected):
    assert visualize._unique_names(names) == expected


def test_attention_distance_figure_reads_every_batch_alike(tmp_path, monkeypatch):
    """Nine images in batches of 8 (the last padded, so one compilation): the figure's mean distance is that of
    one pass over all."""
    config = tiny_run_config()
    params = random_params(config.model)
    pixels = np.random.default_rng(0).uniform(-1, 1, (9, 16, 16, 3)).astype(np.float32)
    drawn = {}

    def draw(distance, image_size, path):
        drawn["distance"] = distance
        return path

    monkeypatch.setattr(visualize, "draw_attention_distance", draw)
    summarizers = []

    def summarizer(*args):
        summarizers.append(original(*args))
        return summarizers[-1]

    original = analysis.attention_summarizer
    monkeypatch.setattr(analysis, "attention_summarizer", summarizer)
    visualize.render_figures(config, params, [(str(i), image) for i, image in enumerate(pixels)], tmp_path / "out")
    assert len(summarizers) == 1 and summarizers[0].forward._cache_size() == 1  # one compilation for both batches
    whole = analysis.capture_attention(config.model, params, pixels)
    expected = np.stack([analysis.attention_distance(a, 4, 1) for a in whole], axis=1).mean(axis=0)
    np.testing.assert_allclose(drawn["distance"], expected, rtol=1e-5)


def _capture_drawings(monkeypatch) -> dict:
    """What render_figures hands to the rollout and attention-distance drawings (the PNGs are still written)."""
    drawn = {}
    draw_rollout, draw_distance = visualize.draw_rollout, visualize.draw_attention_distance

    def rollout(image, mask, path, title=""):
        drawn["mask"] = np.asarray(mask)
        return draw_rollout(image, mask, path, title)

    def distance(distances, image_size, path):
        drawn["distance"] = np.asarray(distances)
        return draw_distance(distances, image_size, path)

    monkeypatch.setattr(visualize, "draw_rollout", rollout)
    monkeypatch.setattr(visualize, "draw_attention_distance", distance)
    return drawn


def _rollout_of_every_row(attentions):
    """Attention rollout recomputed by hand (float64): mean over heads, plus the identity, rows renormalised,
    multiplied through the layers."""
    joint = None
    for attention in attentions:
        a = np.asarray(attention, np.float64)[0].mean(axis=0)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        joint = a if joint is None else a @ joint
    return joint


def test_render_figures_for_gap_and_axial_models(tmp_path, monkeypatch):
    gap = tiny_run_config(classifier="gap")
    params = random_params(gap.model)
    image = np.random.default_rng(1).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    drawn = _capture_drawings(monkeypatch)
    written = visualize.render_figures(gap, params, [("x", image)], tmp_path / "g")
    assert {p.name for p in written} == {"rollout_x.png", "attention_distance.png",
                                         "position_embedding_similarity.png", "embedding_filters.png"}
    # No class token: the map is what average pooling reads, the mean of every token's row, over all 16 patches.
    attentions = analysis.capture_attention(gap.model, params, image[None])
    expected = _rollout_of_every_row(attentions).mean(axis=0).reshape(4, 4)
    np.testing.assert_allclose(drawn["mask"], expected / expected.max(), rtol=1e-4)
    distances = [analysis.attention_distance(a, 4, 0)[0] for a in attentions]  # no prefix token to skip
    np.testing.assert_allclose(drawn["distance"], np.stack(distances), rtol=1e-5)  # (layers, heads)
    axial = tiny_run_config(classifier="gap", axial=True)
    written = visualize.render_figures(axial, random_params(axial.model), [("x", np.zeros((16, 16, 3)))],
                                       tmp_path / "a")
    assert {p.name for p in written} == {"position_embedding_similarity.png", "embedding_filters.png"}


def test_render_figures_for_hybrid_skips_rgb_filters_but_draws_attention(tmp_path, monkeypatch):
    hybrid = tiny_run_config(resnet_layers=(1, 1), patch_size=8)  # trunk stride 8 -> 1x1 embedding patches
    params = random_params(hybrid.model)
    image = np.random.default_rng(2).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    drawn = _capture_drawings(monkeypatch)
    written = visualize.render_figures(hybrid, params, [("x", image)], tmp_path)
    assert {p.name for p in written} == {"rollout_x.png", "attention_distance.png", "position_embedding_similarity.png"}
    # Distances are in pixels: neighbouring tokens of the 2x2 grid are 8 pixels apart (the trunk's stride times
    # the 1-pixel embedding patch), diagonal ones 8 * sqrt(2).
    attentions = analysis.capture_attention(hybrid.model, params, image[None])
    steps = np.array([[0, 1, 1, 2 ** 0.5], [1, 0, 2 ** 0.5, 1], [1, 2 ** 0.5, 0, 1], [2 ** 0.5, 1, 1, 0]]) * 8
    expected = []
    for attention in attentions:
        patches = np.asarray(attention, np.float64)[0, :, 1:, 1:]
        patches = patches / patches.sum(axis=-1, keepdims=True)
        expected.append((patches * steps).sum(axis=-1).mean(axis=-1))
    np.testing.assert_allclose(drawn["distance"], np.stack(expected), rtol=1e-4)  # (layers, heads)


def test_render_figures_rejects_position_embeddings_of_another_size(tmp_path):
    config = tiny_run_config()
    params = random_params(config.model, image_size=24)  # a 6x6 grid
    with pytest.raises(UserError, match="36 patches.*image_size=24"):
        visualize.render_figures(config, params, [], tmp_path)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    return train_digits_once(tmp_path_factory)


def run_cli(*args):
    # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of the command (vit_jax.hugepages, tested in test_hugepages.py).
    return subprocess.run([sys.executable, "-m", "vit_jax.visualize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VIT_JAX_HUGEPAGES": "0"})


def test_cli_non_image_file_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    result = run_cli("--config=configs/demo.py", f"--checkpoint={tmp_path / 'none.npz'}", f"--out={tmp_path}",
                     str(tmp_path / "notes.txt"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "notes.txt" in lines[0] and "not an image" in lines[0]
    # A bucket is no local directory (pathlib made gs://b/x a local gs:/b/x in silence).
    result = run_cli("--config=configs/demo.py", f"--checkpoint={tmp_path / 'none.npz'}", "--out=gs://b/figures")
    assert result.returncode == 2 and "written to a local directory" in result.stderr.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(str(ROOT), "gs:"))


def test_cli_draws_figures_from_an_npz_checkpoint(tmp_path):
    from vit_jax import interop

    config = common.get_config("Ti/16")
    config.model = tiny_model_config()
    interop.save_as(random_params(config.model), config.model, str(tmp_path / "tiny.npz"), "npz")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(tmp_path / "noise.jpg")
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "grey.png")  # greyscale becomes RGB
    overrides = [f"--config.model.{k}={v}" for k, v in
                 dict(variant="custom", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=4).items()]
    result = run_cli("--config=configs/common.py:Ti/16", *overrides, "--config.image_size=16",
                     f"--checkpoint={tmp_path / 'tiny.npz'}", f"--out={tmp_path / 'figures'}",
                     str(tmp_path / "noise.jpg"), str(tmp_path / "grey.png"))
    assert result.returncode == 0, result.stderr
    expected = {"rollout_noise.png": visualize.ROLLOUT_SIZE, "rollout_grey.png": visualize.ROLLOUT_SIZE,
                "attention_distance.png": visualize.DISTANCE_SIZE, "embedding_filters.png": visualize.FILTERS_SIZE,
                "position_embedding_similarity.png": visualize.SIMILARITY_SIZE}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(expected)
    assert sorted(pathlib.Path(line).name for line in result.stdout.split()) == sorted(expected)
    for name, size in expected.items():
        assert png_size(tmp_path / "figures" / name) == visualize.figure_pixels(size)


def test_cli_draws_figures_from_a_training_workdir(trained_digits, tmp_path):
    config, workdir, images_dir = trained_digits
    images = sorted(images_dir.iterdir())[:2]
    result = run_cli(*config_flags(config), f"--checkpoint={workdir}", f"--out={tmp_path / 'figures'}",
                     *map(str, images))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {f"rollout_{images[0].stem}.png": visualize.ROLLOUT_SIZE,
                f"rollout_{images[1].stem}.png": visualize.ROLLOUT_SIZE,
                "attention_distance.png": visualize.DISTANCE_SIZE, "embedding_filters.png": visualize.FILTERS_SIZE,
                "position_embedding_similarity.png": visualize.SIMILARITY_SIZE}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(expected)
    for name, size in expected.items():
        assert png_size(tmp_path / "figures" / name) == visualize.figure_pixels(size)
    # The learned position embeddings are drawn: the similarity figure is not one flat colour.
    with Image.open(tmp_path / "figures" / "position_embedding_similarity.png") as image:
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 50


def test_out_and_image_paths_that_cannot_work_are_user_errors(tmp_path):
    a_file = tmp_path / "figure.png"
    a_file.write_bytes(b"kept")
    with pytest.raises(UserError, match="is a file; give a directory"):
        visualize._check_out(a_file)
    with pytest.raises(UserError, match="cannot be created: .* is a file"):
        visualize._check_out(a_file / "sub")
    visualize._check_out(tmp_path / "new" / "dir")  # creatable: fine, and nothing is made yet
    assert not (tmp_path / "new").exists()
