"""Input-pipeline throughput: 224px training preprocessing (Inception crop, flip) from JPEG, per CPU core.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--images=512] [--seconds=10]

Makes a local JPEG dataset from scikit-image's sample photos (resized to ImageNet-like sizes around 500x375,
random crops and flips, quality 90), prepares it as a TFDS `image_folder` dataset, then measures
1. one core: the training transform (decode + crop + resize + flip) over the ArrayRecord source in one thread;
2. the whole pipeline (grain: 16 reader threads, in --workers processes or in this one with 0; batching to
   --batch_size; uint8 -> float32 [-1, 1]) on the cores this process may use (its CPU affinity, `common.cores`).
Its per-core rate is per core it kept busy: the CPU time of this process (all its threads) and of its grain worker
processes over the timed window / the wall time (`pipeline_cores_busy`), not per core of the machine.
Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)
import numpy as np
from PIL import Image

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
           "page", "horse", "coins", "brick", "grass", "gravel", "moon", "text")


def sample_photos() -> list[np.ndarray]:
    """scikit-image's bundled sample images (those shipped in the package, no download), as RGB uint8."""
    from skimage import data as skdata

    photos = []
    for name in SAMPLES:
        try:
            image = np.asarray(getattr(skdata, name)())
        except Exception:  # a sample that needs a download (pooch) is simply left out
            continue
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(1, image.max()))).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(image[..., :3])
    return photos


def make_jpeg_folder(root: str, num_images: int, seed: int = 0) -> None:
    """`num_images` JPEGs of ImageNet-like sizes in ROOT/train/<class>/, 8 classes."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    for i in range(num_images):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.6, 1.0)), int(width * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
        long_side = int(rng.integers(400, 600))
        scale = long_side / max(image.size)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, "train", f"class{i % 8}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), format="JPEG", quality=90)


def _descendants(pid: int) -> list[int]:
    """The live processes below `pid` (grain's workers), from /proc; [] where it cannot be read."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, then ppid
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads and of its live descendant processes so far."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
        except (OSError, ValueError, IndexError):
            continue
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.count(1), default=512)
    parser.add_argument("--seconds", type=common.positive_float, default=10.0,
                        help="how long each of the two measurements runs (each does at least one image / batch)")
    parser.add_argument("--batch_size", type=common.count(1), default=128)
    parser.add_argument("--workers", type=common.count(0), default=0,
                        help="grain worker processes (0: reader threads in this process only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import common as configs_common
    from vit_jax import data
    from vit_jax.data import datasets, preprocess

    cores = common.cores()
    with tempfile.TemporaryDirectory() as tmp:
        make_jpeg_folder(os.path.join(tmp, "jpeg"), args.images)
        data.prepare("image_folder", os.path.join(tmp, "tfds"), os.path.join(tmp, "jpeg"))
        config = configs_common.get_config("B/16")
        config.dataset, config.tfds_data_dir, config.num_classes = "image_folder", os.path.join(tmp, "tfds"), 8
        config.train_split = config.eval_split = "train"
        config.batch_size = args.batch_size
        config.data_workers = args.workers

        source, _ = datasets.open_split(config, "train")
        mean_bytes = np.mean([len(source[i]["image"]) for i in range(len(source))])
        transform = preprocess.TrainPreprocess(image_size=224, num_classes=8, crop_min_area=config.pp.crop_min_area)
        rng = np.random.default_rng(0)
        count, start = 0, time.perf_counter()
        while True:  # at least one image, however small --seconds
            transform(source[count % len(source)], rng)
            count += 1
            if time.perf_counter() - start >= args.seconds:
                break
        per_core = count / (time.perf_counter() - start)

        sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
        iterator = data.make_train_iterator(config, sharding)
        next(iterator)["image"].block_until_ready()  # warm-up: threads started, buffer filled
        batches, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
        while True:  # at least one batch
            next(iterator)["image"].block_until_ready()
            batches += 1
            if time.perf_counter() - start >= args.seconds:
                break
        cpu_used = cpu_seconds() - cpu_start  # before close(): the workers' CPU time goes with them
        wall = time.perf_counter() - start
        iterator.close()
    pipeline_rate = batches * args.batch_size / wall
    cores_busy = cpu_used / wall

    cores_for_3000 = int(np.ceil(3000 / per_core))
    where = (f"{args.workers} worker process{'es' if args.workers > 1 else ''}" if args.workers
             else "reader threads in this process")
    rows = [("CPU cores this process may use", f"{cores}"),
            ("JPEGs (mean size)", f"{args.images} ({mean_bytes / 1024:.0f} KiB)"),
            ("train transform, 1 core (img/s)", f"{per_core:.0f}"),
            (f"whole pipeline, {where}, batch {args.batch_size} (img/s)", f"{pipeline_rate:.0f}"),
            ("whole pipeline: cores busy (this process + workers)", f"{cores_busy:.2f} of {cores}"),
            ("whole pipeline per busy core (img/s)", f"{pipeline_rate / cores_busy:.0f}" if cores_busy else "n/a"),
            ("cores to feed 3,000 img/s (1-core transform rate)", f"{cores_for_3000}")]
    result = {"benchmark": "input_pipeline", "image_size": 224, "cpu_cores": cores,
              "images_per_sec_per_core": round(per_core, 1),
              "pipeline_images_per_sec": round(pipeline_rate, 1),
              "pipeline_cores_busy": round(cores_busy, 2),
              "pipeline_images_per_sec_per_core": round(pipeline_rate / cores_busy, 1) if cores_busy else None,
              "data_workers": args.workers, "batch_size": args.batch_size, "seconds": args.seconds,
              "cores_for_3000_images_per_sec": cores_for_3000, "mean_jpeg_bytes": int(mean_bytes)}
    common.print_table(rows, result)
    return result


if __name__ == "__main__":
    common.run_main(main)
