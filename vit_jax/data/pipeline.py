"""TFDS ArrayRecord -> grain -> global `jax.Array` batches: per-process sharding, shuffling, checkpointable state.

Train: each process reads only its share of the split (`source[process_index::process_count]`), shuffles it
with `config.shuffle_seed` (reshuffled every epoch), repeats forever, decodes and augments each example
(`preprocess.TrainPreprocess`, seeded per example so a restored iterator repeats the same augmentation),
drops corrupt images, batches to the per-process batch, optionally mixes up, and runs in `config.data_workers`
processes. The global batch is assembled with `jax.make_array_from_process_local_data` on the batch sharding.
The iterator's state (a small JSON dict) goes into the checkpoint, so a resumed run continues on exactly the
next batch.

Eval: a fresh pass over the split on each call; every example is seen once and the last batch is padded with
mask 0. All processes yield the same number of batches (the largest share decides), as collectives need.
"""

from __future__ import annotations

import collections
import math
import zlib
from collections.abc import Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from vit_jax.config_check import ConfigError
from vit_jax.data import preprocess
from vit_jax.data.datasets import DatasetInfo, LabeledSource, open_split
from vit_jax.data.errors import DatasetError

STATE_VERSION = 2  # 2: the shuffle's seed is hashed (the same position is other examples)
DEVICE_KEYS = ("image", "label")  # what the training step receives; "index" stays on the host


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is invalid: expected 0 <= process_index < "
                         f"process_count={process_count}")
    return process_index, process_count


def per_process_batch(global_batch: int, process_count: int, field: str) -> int:
    """The share of a global batch each process loads; it must split evenly."""
    if global_batch % process_count:
        raise ConfigError(f"config.{field}={global_batch} is invalid: it must split evenly over the "
                          f"{process_count} processes; use a multiple of {process_count}")
    return global_batch // process_count


def check_rows_per_process(batch_sharding: jax.sharding.Sharding, global_batch: int, field: str) -> None:
    """Raise `ConfigError` if two processes hold the same rows of a batch on `batch_sharding`.

    Each process loads rows no other process loads (`process_share`). Rows on devices of several processes, as
    when a mesh's model axis spans processes, would get different examples on each, and the global array
    would be assembled with a smaller batch than the config's.
    """
    owners: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for device, index in batch_sharding.devices_indices_map((global_batch,)).items():
        owners[index[0].indices(global_batch)[:2]].add(device.process_index)
    shared = sorted((rows, processes) for rows, processes in owners.items() if len(processes) > 1)
    if shared:
        (start, stop), processes = shared[0]
        mesh = getattr(batch_sharding, "mesh", None)
        axes = f" (mesh {dict(mesh.shape)})" if mesh is not None else ""
        raise ConfigError(f"config.{field}={global_batch}: rows {start}:{stop} of each batch would sit on devices "
                          f"of processes {sorted(processes)}{axes}, but every process loads rows of its own; "
                          f"keep config.mesh.model within one process: at most, and a divisor of, its "
                          f"{jax.local_device_count()} devices")


def process_share(source: LabeledSource, process_index: int, process_count: int) -> grain.MapDataset:
    """The examples this process reads: every process_count-th one, starting at process_index (disjoint shares)."""
    dataset = grain.MapDataset.source(source)
    if process_count > 1:
        dataset = dataset[process_index::process_count]
    return dataset


def _read_options() -> grain.ReadOptions:
    # Reader threads overlap reading and decoding with the training step; the buffer holds decoded uint8 examples.
    return grain.ReadOptions(num_threads=16, prefetch_buffer_size=256)


def _with_workers(dataset: grain.IterDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    if config.data_workers <= 0:
        return dataset
    if not flags.FLAGS.is_parsed():
        # grain's workers read absl flags; outside an absl app (notebooks, scripts) use their defaults.
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=config.data_workers,
                                           per_worker_buffer_size=max(1, config.prefetch_batches))
    return dataset.mp_prefetch(options)


def _seed(purpose: str, seed: int, process_index: int) -> int:
    """Distinct, reproducible seeds per purpose and process (so hosts do not draw the same augmentations);
    `process_index=0` on every process for a draw they share (mixup's weight)."""
    return zlib.crc32(f"{purpose}/{seed}/{process_index}".encode()) & 0x7FFFFFFF


def check_images_decode(source: LabeledSource, what: str, limit: int = 64) -> None:
    """Raise `DatasetError` when none of the first `limit` images of `source` decodes.

    Corrupt images are skipped one by one while training; a split of nothing but undecodable files (text named
    .jpg, a wrong directory) would otherwise leave the infinite train stream waiting forever for a batch.
    """
    first_error = None
    for index in range(min(len(source), limit)):
        try:
            preprocess.open_image(source[index]["image"]).load()
            return
        except preprocess.CorruptImageError as e:
            first_error = first_error or e
        except (OSError, ValueError, SyntaxError) as e:  # the pixels after a readable header
            first_error = first_error or preprocess.CorruptImageError(f"cannot decode image: {e}")
    if first_error is not None:
        raise DatasetError(f"{what}: none of its first {min(len(source), limit)} images can be decoded "
                           f"(example 0: {first_error}); check the files the dataset was prepared from")


def make_train_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int
                       ) -> tuple[grain.IterDataset, DatasetInfo]:
    """This process's infinite stream of numpy batches {"image", "label", "index"} of batch_size / process_count."""
    source, info = open_split(config, config.train_split, train=True)
    if len(source) < process_count:
        raise DatasetError(f"config.train_split={config.train_split!r} of {config.dataset!r} has {len(source)} "
                           f"examples, fewer than the {process_count} processes")
    batch_size = per_process_batch(config.batch_size, process_count, "batch_size")
    check_images_decode(source, f"config.train_split={config.train_split!r} of {config.dataset!r}")
    transform = preprocess.TrainPreprocess(
        image_size=config.image_size, num_classes=config.num_classes, inception_crop=config.pp.inception_crop,
        crop_min_area=config.pp.crop_min_area, flip=config.pp.flip, random_translate=config.pp.random_translate,
        randaugment_layers=config.pp.randaugment_layers, randaugment_magnitude=config.pp.randaugment_magnitude,
        antialias=config.pp.antialias)
    dataset = process_share(source, process_index, process_count)
    # grain reshuffles epoch e with seed + e: shuffle_seed itself would give seed s+1 the epochs of seed s, one
    # epoch on. A hashed seed keeps the runs of a seed sweep apart.
    dataset = dataset.shuffle(seed=_seed("shuffle", config.shuffle_seed, process_index)).repeat()
    dataset = dataset.random_map(transform, seed=_seed("augment", config.shuffle_seed, process_index))
    stream = dataset.to_iter_dataset(_read_options())  # drops the None of corrupt images
    stream = stream.batch(batch_size, drop_remainder=True)
    if config.pp.mixup_alpha > 0:
        # The same weights on every process: one lam per global step, as big_vision draws it in the train step
        # (and the weights do not depend on the process count).
        mix_seed = _seed("mixup", config.shuffle_seed, 0)
        stream = stream.random_map(preprocess.MixupBatch(config.pp.mixup_alpha), seed=mix_seed)
    return _with_workers(stream, config), info


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding, keys: tuple[str, ...]
              ) -> dict[str, jax.Array]:
    """This process's rows -> global arrays on `sharding` (images as float32 in [-1, 1])."""
    out = {}
    for key in keys:
        value = batch[key]
        if key == "image" and value.dtype == np.uint8:
            # Sent as uint8 (4x fewer bytes to the devices) and scaled there, keeping the sharding.
            out[key] = _uint8_to_unit_range(jax.make_array_from_process_local_data(sharding, value))
        elif key == "index":  # positions in the split: exact as int32, not past 2^24 as float32
            out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value, np.int32))
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value, np.float32))
    return out


@jax.jit
def _uint8_to_unit_range(images: jax.Array) -> jax.Array:
    # XLA's rounding can give 1.0000001 for 255: clip so the range is exactly [-1, 1].
    return jnp.clip(images.astype(jnp.float32) * (2.0 / 255.0) - 1.0, -1.0, 1.0)


class TrainIterator:
    """Infinite iterator of global train batches, `prefetch` of them placed on devices ahead of use.

    `get_state()` describes the position after the last batch returned (not the prefetched ones), so a run
    restored with `set_state` continues on exactly the next batch.
    """

    def __init__(self, dataset: grain.IterDataset, sharding: jax.sharding.Sharding, prefetch: int,
                 identity: dict):
        self._iterator = iter(dataset)
        self._sharding = sharding
        self._prefetch = max(0, prefetch)
        self._identity = identity
        self._ahead: collections.deque = collections.deque()
        self._state = self._iterator.get_state()

    def __iter__(self) -> TrainIterator:
        return self

    def _fetch(self) -> None:
        batch = next(self._iterator)
        self._ahead.append((to_global(batch, self._sharding, DEVICE_KEYS), self._iterator.get_state()))

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._ahead) <= self._prefetch:
            self._fetch()
        batch, self._state = self._ahead.popleft()
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position: the grain state plus what must match on restore."""
        return {**self._identity, "version": STATE_VERSION, "grain": self._state}

    def set_state(self, state: dict) -> bool:
        """Continue from a `get_state()` result of an iterator over the same data, batch and processes.

        False, and the stream starts afresh, when another version of this pipeline wrote `state` (an upgrade in
        the middle of a run): its positions name other examples here. Other settings are a `DatasetError`.
        """
        if state.get("version") != STATE_VERSION:
            return False
        saved = {key: state.get(key) for key in self._identity}
        if saved != self._identity:
            changed = {k: (saved[k], v) for k, v in self._identity.items() if saved[k] != v}
            raise DatasetError(f"cannot resume the data iterator exactly: its saved state was made with different "
                               f"settings (saved, now): {changed}")
        self._ahead.clear()
        try:
            self._iterator.set_state(state["grain"])
        except (KeyError, TypeError, ValueError) as e:  # a state of another pipeline's shape
            raise DatasetError(f"cannot resume the data iterator exactly: its saved state does not fit this input "
                               f"pipeline ({type(e).__name__}: {e})") from e
        self._state = state["grain"]
        return True

    def close(self) -> None:
        """Stop grain's worker processes and reader threads."""
        self._ahead.clear()
        self._iterator.close()


def make_train_iterator(config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding, *,
                        process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """Global train batches {"image": (B, S, S, 3) float32 in [-1, 1], "label": (B, C) float32}, forever.

    `process_index` / `process_count` default to jax's; given explicitly (to simulate hosts) the arrays hold
    only that process's share of the batch.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    check_rows_per_process(batch_sharding, config.batch_size, "batch_size")
    dataset, _ = make_train_dataset(config, process_index=process_index, process_count=process_count)
    identity = {"dataset": config.dataset, "split": config.train_split, "batch_size": config.batch_size,
                "image_size": config.image_size, "shuffle_seed": config.shuffle_seed,
                "mixup": config.pp.mixup_alpha > 0,  # a step of its own in the pipeline, with its own state
                "process_index": process_index, "process_count": process_count,
                "data_workers": config.data_workers}
    return TrainIterator(dataset, batch_sharding, config.prefetch_batches, identity)


def _rebatch(batches: Iterator[dict[str, np.ndarray]], batch_size: int, num_batches: int,
             template: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `num_batches` batches of `batch_size` rows from variable-sized ones, zero-padded (mask 0) at the end.

    `template` (zero rows of each key, as the batches have them) shapes the padding, also of a process whose
    share has no decodable image, or none at all: every process must take part in each eval step.
    """
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    produced = 0
    for batch in batches:
        pending.append(batch)
        pending_rows += len(batch["mask"])
        while pending_rows >= batch_size:
            merged = {key: np.concatenate([b[key] for b in pending]) for key in batch}
            yield {key: value[:batch_size] for key, value in merged.items()}
            produced += 1
            pending = [{key: value[batch_size:] for key, value in merged.items()}]
            pending_rows -= batch_size
    if produced > num_batches or (produced == num_batches and pending_rows):
        raise AssertionError(f"eval produced more than the expected {num_batches} batches")
    while produced < num_batches:
        rows = [b for b in pending if len(b["mask"])]
        merged = ({key: np.concatenate([b[key] for b in rows]) for key in template} if rows
                  else {key: value[:0] for key, value in template.items()})
        padding = batch_size - len(merged["mask"])
        yield {key: np.concatenate([value, np.zeros((padding, *value.shape[1:]), value.dtype)])
               for key, value in merged.items()}
        produced += 1
        pending = []


def eval_batches(config: ml_collections.ConfigDict, *, process_index: int, process_count: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """This process's numpy eval batches {"image", "label", "mask", "index"}, one pass, padded with mask 0."""
    source, _ = open_split(config, config.eval_split)
    batch_size = per_process_batch(config.eval_batch_size, process_count, "eval_batch_size")
    # Every process yields as many batches as the largest share needs.
    num_batches = max(1, math.ceil(math.ceil(len(source) / process_count) / batch_size))
    transform = preprocess.EvalPreprocess(image_size=config.image_size, num_classes=config.num_classes,
                                          crop_fraction=config.pp.eval_crop_fraction,
                                          antialias=config.pp.antialias)
    dataset = process_share(source, process_index, process_count).map(transform)
    stream = dataset.to_iter_dataset(_read_options()).batch(batch_size, drop_remainder=False)
    return _closing(iter(_with_workers(stream, config)), batch_size, num_batches, transform.empty_batch())


def _closing(iterator, batch_size: int, num_batches: int, template: dict[str, np.ndarray]
             ) -> Iterator[dict[str, np.ndarray]]:
    try:
        yield from _rebatch(iterator, batch_size, num_batches, template)
    finally:
        iterator.close()


def make_eval_iterator(config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding, *,
                       process_index: int | None = None, process_count: int | None = None,
                       keys: tuple[str, ...] = ("image", "label", "mask")) -> Iterator[dict[str, jax.Array]]:
    """A fresh pass over the eval split: global batches of eval_batch_size with "mask" (1 real, 0 padding);
    `keys` may add "index" (each row's position in the split, 0 for padding)."""
    process_index, process_count = _resolve_processes(process_index, process_count)
    check_rows_per_process(batch_sharding, config.eval_batch_size, "eval_batch_size")
    batches = eval_batches(config, process_index=process_index, process_count=process_count)  # errors raise here
    return (to_global(batch, batch_sharding, keys) for batch in batches)
