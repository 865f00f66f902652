"""`python -m vit_jax.visualize --config=configs/vit_b16.py --checkpoint=PATH --out=DIR [IMAGE ...]`: figures.

Writes PNGs of the ViT paper's analysis figures (Dosovitskiy et al., 2020) for a trained model:

- `rollout_<image>.png` per image: the image, the attention rollout over it, and the image weighted by the
  rollout (Figures 6 and 14);
- `attention_distance.png`: mean attention distance of every head against depth, averaged over the images
  (Figure 7, right);
- `position_embedding_similarity.png`: cosine similarity of each patch's position embedding with all the
  others, one small grid per patch (Figure 7, centre);
- `embedding_filters.png`: the first 28 principal components of the patch-embedding filters as RGB patches
  (Figure 7, left).

Images are preprocessed as evaluation does (the central `pp.eval_crop_fraction` of each side, resized to
`config.image_size`, values in [-1, 1]). Without IMAGE arguments, scikit-image's sample photos
(astronaut, chelsea, coffee) are used. The checkpoint is anything `vit_jax.interop.load_pretrained` reads
(official .npz, timm/HF weights, our orbax checkpoints); its position embeddings must fit `config.image_size`.
The numbers come from `vit_jax.analysis`; this module only loads, runs and draws.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from absl import flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags
from PIL import Image

from vit_jax import analysis, cli, config_check, predict
from vit_jax.errors import UserError

# Figure sizes in inches at FIGURE_DPI: every PNG of a kind has the same pixel size, whatever the model.
FIGURE_DPI = 100
ROLLOUT_SIZE = (9.0, 3.2)
DISTANCE_SIZE = (5.0, 4.0)
SIMILARITY_SIZE = (6.0, 5.2)
FILTERS_SIZE = (7.0, 4.6)
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee")  # scikit-image's bundled photos (no download)
CAPTURE_BATCH = 8  # images per forward pass: bounds the memory of one layer's attention maps


def figure_pixels(size_inches: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a PNG drawn at `size_inches`."""
    return round(size_inches[0] * FIGURE_DPI), round(size_inches[1] * FIGURE_DPI)


def sample_images(image_size: int, crop_fraction: float = 1.0, antialias: bool = False
                  ) -> list[tuple[str, np.ndarray]]:
    """scikit-image's sample photos (SAMPLE_IMAGES), preprocessed, with their names."""
    try:
        import skimage.data  # only needed when no image is given
    except ImportError as e:
        raise UserError("no IMAGE given and scikit-image (its sample photos stand in) is not installed: "
                        "pass image files or `pip install scikit-image`") from e
    from vit_jax.data.preprocess import eval_pixels  # imports grain and TFDS (~3 s): only once images are read

    return [(name, eval_pixels(Image.fromarray(getattr(skimage.data, name)()), image_size, crop_fraction, antialias))
            for name in SAMPLE_IMAGES]


def _to_unit(image: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _save(figure: Figure, path: pathlib.Path) -> pathlib.Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI)  # no bbox_inches="tight": keep the pixel size fixed
    return path


def draw_rollout(image: np.ndarray, mask: np.ndarray, path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Three panels: the image in [-1, 1], the rollout `mask` (rows, columns) over it, the image times the mask."""
    picture = _to_unit(image)
    upsampled = np.clip(analysis.upsample_mask(mask, picture.shape[:2]), 0.0, 1.0)
    figure = Figure(figsize=ROLLOUT_SIZE, layout="constrained")
    panels = figure.subplots(1, 3)
    panels[0].imshow(picture)
    panels[0].set_title("input")
    panels[1].imshow(picture)
    panels[1].imshow(upsampled, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    panels[1].set_title("attention rollout")
    panels[2].imshow(picture * upsampled[..., None])
    panels[2].set_title("input x rollout")
    for panel in panels:
        panel.set_axis_off()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def draw_attention_distance(distances: np.ndarray, image_size: int, path: pathlib.Path) -> pathlib.Path:
    """Scatter of mean attention distance (layers, heads) in pixels against depth, one colour per head."""
    num_layers, num_heads = distances.shape
    figure = Figure(figsize=DISTANCE_SIZE, layout="constrained")
    axes = figure.subplots()
    depth = np.arange(1, num_layers + 1)
    for head in range(num_heads):
        axes.scatter(depth, distances[:, head], s=14, label=f"head {head + 1}")
    axes.set_xlabel("network depth (layer)")
    axes.set_ylabel("mean attention distance (pixels)")
    axes.set_xlim(0.5, num_layers + 0.5)
    axes.set_ylim(0.0, max(image_size, 1.05 * float(distances.max())))  # far corners can exceed image_size
    axes.set_xticks(depth if num_layers <= 16 else depth[::2])
    if num_heads <= 16:
        axes.legend(fontsize=6, ncol=2, loc="lower right")
    return _save(figure, path)


def _mosaic(tiles: np.ndarray, columns: int, fill: float) -> np.ndarray:
    """Tiles (n, h, w, ...) laid out row-major in `columns` columns with one-pixel `fill` gaps."""
    n, height, width = tiles.shape[:3]
    rows = -(-n // columns)
    mosaic = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1) + tiles.shape[3:], fill, np.float64)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        mosaic[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = tile
    return mosaic


def _grid_ticks(axes: Any, grid: tuple[int, int]) -> None:
    rows, columns = grid
    row_step, column_step = max(1, rows // 8), max(1, columns // 8)
    axes.set_yticks([r * (rows + 1) + (rows - 1) / 2 for r in range(0, rows, row_step)],
                    [str(r + 1) for r in range(0, rows, row_step)])
    axes.set_xticks([c * (columns + 1) + (columns - 1) / 2 for c in range(0, columns, column_step)],
                    [str(c + 1) for c in range(0, columns, column_step)])


def draw_position_similarity(similarity: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """A grid of grids: tile (i, j) is the cosine similarity (rows, columns, rows, columns) of patch (i, j)."""
    rows, columns = similarity.shape[:2]
    tiles = similarity.reshape(rows * columns, rows, columns)
    mosaic = np.ma.masked_invalid(_mosaic(tiles, columns, np.nan))
    figure = Figure(figsize=SIMILARITY_SIZE, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(mosaic, cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
    _grid_ticks(axes, (rows, columns))
    axes.set_xlabel("input patch column")
    axes.set_ylabel("input patch row")
    axes.set_title("position embedding similarity")
    figure.colorbar(image, ax=axes, label="cosine similarity", shrink=0.8)
    return _save(figure, path)


def draw_embedding_filters(components: np.ndarray, ratios: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """Principal components (k, patch, patch, 3) of the embedding filters as RGB tiles, each scaled to [0, 1]."""
    low = components.min(axis=(1, 2, 3), keepdims=True)
    high = components.max(axis=(1, 2, 3), keepdims=True)
    tiles = (components - low) / np.maximum(high - low, 1e-12)
    figure = Figure(figsize=FILTERS_SIZE, layout="constrained")
    axes = figure.subplots()
    axes.imshow(_mosaic(tiles, min(7, len(tiles)), 1.0), interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(f"RGB embedding filters: first {len(tiles)} principal components "
                   f"({100 * ratios.sum():.0f}% of the variance)", fontsize=10)
    return _save(figure, path)


def _unique_names(names: Sequence[str]) -> list[str]:
    """File-safe names, numbered where two images share a name; distinct even where the file system ignores case
    (a numbered name that is another image's name gets another number)."""
    safe = ["".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "image" for name in names]
    folded = [name.casefold() for name in safe]
    taken = {name for name in folded if folded.count(name) == 1}
    unique = []
    for i, (name, key) in enumerate(zip(safe, folded)):
        if folded.count(key) > 1:
            number = i
            while f"{number:02d}_{name}".casefold() in taken:
                number += len(safe)
            name = f"{number:02d}_{name}"
            taken.add(name.casefold())
        unique.append(name)
    return unique


def _check_grid(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> None:
    """The checkpoint's position embeddings must hold the patch grid of `config.image_size`."""
    m = config.model
    tokens = params["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
    patches = tokens - analysis.num_prefix_tokens(m)
    expected = (config.image_size // m.patch_size) ** 2
    if patches != expected:
        side = int(round(np.sqrt(max(patches, 0))))
        raise UserError(
            f"the checkpoint's position embeddings hold {patches} patches ({side}x{side}, i.e. "
            f"--config.image_size={side * m.patch_size} at patch {m.patch_size}), but config.image_size="
            f"{config.image_size} gives {expected}: set --config.image_size={side * m.patch_size}")


def render_figures(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                   images: Sequence[tuple[str, np.ndarray]], out_dir: str | pathlib.Path,
                   num_components: int = 28) -> list[pathlib.Path]:
    """Draw every figure for `params` and named preprocessed `images` into `out_dir`; returns the PNG paths.

    Figures that do not apply to the model are skipped with a note on stderr: attention rollout and distance
    for Axial-ViT (no full attention), embedding filters for hybrids (they embed ResNet features, not pixels).
    """
    m = config.model
    params = nn.unbox(params)
    _check_grid(config, params)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_prefix = analysis.num_prefix_tokens(m)
    written = []
    if m.axial:
        print("note: Axial-ViT attends within rows and columns only; skipping attention rollout and distance",
              file=sys.stderr)
    elif images:
        names = _unique_names([name for name, _ in images])
        pixels = np.stack([image for _, image in images])
        summarize = analysis.attention_summarizer(m, params)  # one compilation for every batch
        batch = min(CAPTURE_BATCH, len(pixels))
        grid = analysis.patch_grid(pixels.shape, m.patch_size)  # the grid the summarizer reduced over
        distances = []
        for start in range(0, len(pixels), batch):
            chunk = pixels[start:start + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            rollout, distance = summarize(padded)
            masks = analysis.rollout_mask(rollout[:len(chunk)], num_prefix, grid)
            for offset, mask in enumerate(masks):
                name = names[start + offset]
                written.append(draw_rollout(pixels[start + offset], mask, out / f"rollout_{name}.png", name))
            distances.append(distance[:len(chunk)])  # (batch, layers, heads)
        mean_distance = np.concatenate(distances).mean(axis=0)
        written.append(draw_attention_distance(mean_distance, config.image_size, out / "attention_distance.png"))
    pos_embedding = params["Transformer"]["posembed_input"]["pos_embedding"]
    similarity = analysis.position_embedding_similarity(pos_embedding, num_prefix)
    written.append(draw_position_similarity(similarity, out / "position_embedding_similarity.png"))
    kernel = np.asarray(params["embedding"]["kernel"])
    if m.resnet_layers:
        print("note: a hybrid's patch embedding reads ResNet features, not RGB pixels; skipping embedding filters",
              file=sys.stderr)
    else:
        components, ratios = analysis.embedding_filter_components(kernel, num_components)
        written.append(draw_embedding_filters(components, ratios, out / "embedding_filters.png"))
    return written


def load_params(path: str, model_config: ml_collections.ConfigDict, source_format: str | None = None) -> dict:
    """The model's params from any checkpoint `vit_jax.interop.load_pretrained` reads, as trained.

    Head and position embeddings are kept as the checkpoint has them (no resize: the figures are about the
    learned weights); `render_figures` says which `image_size` fits. Sets the config's numerics (GELU, LN
    epsilon) to the weights' origin, as `load_pretrained` does.
    """
    from vit_jax import interop  # imported here: only this entry point needs the checkpoint readers

    try:
        return interop.load_pretrained(path, model_config, source_format=source_format)
    except interop.MissingHeadError:
        # A masked-patch-prediction checkpoint: no figure reads the head, so a 1-class zero one will do.
        return interop.load_pretrained(path, model_config, num_classes=1, source_format=source_format)


def _define_flags() -> None:
    """Flags of the command; defined only when run as a program, so importing this module defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_b16.py.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Checkpoint: official .npz, timm/HF weights, or an orbax checkpoint.")
    flags.DEFINE_string("out", None, "Directory to write the PNGs into (created if missing).")
    flags.DEFINE_string("source_format", None, "Checkpoint format, if its name does not tell (see vit_jax.interop).")
    flags.DEFINE_integer("num_components", 28, "Principal components of the embedding filters to draw.")
    flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv: Sequence[str]) -> None:
    config = flags.FLAGS.config
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the written paths, not the checkpoint readers' progress
    config_check.validate_model(config.model, config.image_size)
    config_check.validate_eval_crop(config.pp)
    if flags.FLAGS.num_components < 1:
        raise UserError(f"--num_components={flags.FLAGS.num_components}: expected a positive integer")
    if "://" in flags.FLAGS.out:  # pathlib would make gs://b/x a local directory gs:/b/x, in silence
        raise UserError(f"--out={flags.FLAGS.out}: the figures are written to a local directory; copy them to "
                        "the bucket afterwards (gcloud storage cp -r)")
    checkpoint = cli.checkpoint_path(flags.FLAGS.checkpoint)  # an empty one is refused before any image is read
    predict.check_source_format(flags.FLAGS.source_format)
    out = pathlib.Path(flags.FLAGS.out).expanduser()
    _check_out(out)
    crop_fraction, antialias = config.pp.eval_crop_fraction, config.pp.antialias
    # Read every image before the (slow) checkpoint, so a bad file fails at once.
    if len(argv) > 1:
        images = [(pathlib.Path(p).stem, predict.read_image(p, config.image_size, crop_fraction, antialias))
                  for p in argv[1:]]
    else:
        images = sample_images(config.image_size, crop_fraction, antialias)
    with cli.checkpoint_errors(checkpoint):  # the readers' errors name the path: say it is --checkpoint's
        params = load_params(checkpoint, config.model, flags.FLAGS.source_format)
    try:
        for path in render_figures(config, params, images, out, flags.FLAGS.num_components):
            print(path)
    except OSError as e:
        raise UserError(f"--out={out}: cannot write the figures there ({e.strerror or e})") from e


def _check_out(out: pathlib.Path) -> None:
    """--out must be a directory or creatable as one: found before the slow work, not after it."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == out and not out.is_dir():
        raise UserError(f"--out={out}: is a file; give a directory for the figures")
    if not existing.is_dir():
        raise UserError(f"--out={out}: cannot be created: {existing} is a file")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
