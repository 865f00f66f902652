"""TFDS ArrayRecord -> grain -> global `jax.Array` batches: per-process sharding, shuffling, checkpointable state.

Train: each process reads only its share of the split (`source[process_index::process_count]`), shuffles it
with `config.shuffle_seed` (reshuffled every epoch), repeats forever, decodes and augments each example
(`preprocess.TrainPreprocess`, seeded per example so a restored iterator repeats the same augmentation),
drops corrupt images, batches to the per-process batch, optionally mixes up, and runs in `config.data_workers`
processes. The global batch is assembled with `jax.make_array_from_process_local_data` on the batch sharding.
The iterator's state (a small JSON dict) goes into the checkpoint, so a resumed run continues on exactly the
next batch, also with another `data_workers` where the position exists for it. A position that means other
examples now (the split re-prepared with another length, another grain) restarts the stream with a warning,
its seeds mixed with the step it restarts at: the same seeds would replay the examples and augmentations of the
steps already trained (`TrainIterator.restart`).

Eval: a fresh pass over the split on each call; every example is seen once and the last batch is padded with
mask 0. All processes yield the same number of batches (the largest share decides), as collectives need.
"""

from __future__ import annotations

import collections
import copy
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

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


def _seed(purpose: str, seed: int, process_index: int, restart_step: int = 0) -> int:
    """Distinct, reproducible seeds per purpose and process (so hosts do not draw the same augmentations);
    `process_index=0` on every process for a draw they share (mixup's weight). `restart_step` > 0: the seeds of a
    stream restarted at that step (`TrainIterator.restart`), other than the first stream's."""
    restart = f"/restart{restart_step}" if restart_step else ""
    return zlib.crc32(f"{purpose}/{seed}/{process_index}{restart}".encode()) & 0x7FFFFFFF


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


def _open_train_split(config: ml_collections.ConfigDict, process_count: int) -> tuple[LabeledSource, DatasetInfo]:
    """The train split, checked: enough examples for every process, an even batch split, decodable images."""
    source, info = open_split(config, config.train_split, train=True)
    if len(source) < process_count:
        raise DatasetError(f"config.train_split={config.train_split!r} of {config.dataset!r} has {len(source)} "
                           f"examples, fewer than the {process_count} processes")
    per_process_batch(config.batch_size, process_count, "batch_size")
    check_images_decode(source, f"config.train_split={config.train_split!r} of {config.dataset!r}")
    return source, info


def _train_stream(config: ml_collections.ConfigDict, source: LabeledSource, process_index: int, process_count: int,
                  restart_step: int) -> grain.IterDataset:
    """This process's infinite stream of numpy batches; `restart_step` > 0 mixes that step into every seed."""
    batch_size = per_process_batch(config.batch_size, process_count, "batch_size")
    transform = preprocess.TrainPreprocess(
        image_size=config.image_size, num_classes=config.num_classes, inception_crop=config.pp.inception_crop,
        crop_min_area=config.pp.crop_min_area, flip=config.pp.flip, random_translate=config.pp.random_translate,
        randaugment_layers=config.pp.randaugment_layers, randaugment_magnitude=config.pp.randaugment_magnitude,
        antialias=config.pp.antialias)
    dataset = process_share(source, process_index, process_count)
    # grain reshuffles epoch e with seed + e: shuffle_seed itself would give seed s+1 the epochs of seed s, one
    # epoch on. A hashed seed keeps the runs of a seed sweep apart.
    dataset = dataset.shuffle(seed=_seed("shuffle", config.shuffle_seed, process_index, restart_step)).repeat()
    dataset = dataset.random_map(transform, seed=_seed("augment", config.shuffle_seed, process_index, restart_step))
    stream = dataset.to_iter_dataset(_read_options())  # drops the None of corrupt images
    stream = stream.batch(batch_size, drop_remainder=True)
    if config.pp.mixup_alpha > 0:
        # The same weights on every process: one lam per global step, as big_vision draws it in the train step
        # (and the weights do not depend on the process count).
        mix_seed = _seed("mixup", config.shuffle_seed, 0, restart_step)
        stream = stream.random_map(preprocess.MixupBatch(config.pp.mixup_alpha), seed=mix_seed)
    return _with_workers(stream, config)


def make_train_dataset(config: ml_collections.ConfigDict, *, process_index: int, process_count: int,
                       restart_step: int = 0) -> tuple[grain.IterDataset, DatasetInfo]:
    """This process's infinite stream of numpy batches {"image", "label", "index"} of batch_size / process_count;
    `restart_step` > 0: the stream of a run restarted at that step (other seeds, `TrainIterator.restart`)."""
    source, info = _open_train_split(config, process_count)
    return _train_stream(config, source, process_index, process_count, restart_step), info


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


def _worker_states(state: dict, workers: int) -> list[dict]:
    """Each grain worker's part of a train stream's grain state, the stream's own without workers (grain 0.2:
    `mp_prefetch` interleaves one iterator per worker, each over positions i, i + W, ... of the shuffled stream)."""
    return [state] if workers == 0 else list(state["iterators_in_use_states"])


def _worker_position(state: dict) -> tuple[int, int | None]:
    """(next position of a worker's slice of the shuffled stream, its next mixup draw or None without mixup)."""
    if "index_for_rng" in state:  # mixup's random_map over the batches
        return int(state["parent"]["next_index"]), int(state["index_for_rng"])
    return int(state["next_index"]), None


def _deal(total: int, workers: int) -> list[int]:
    """How many of positions 0..total-1 each of max(1, workers) workers holds when dealt out round-robin."""
    count = max(1, workers)
    return [-(-(total - i) // count) for i in range(count)]


def _prefix(nexts: list[int]) -> int | None:
    """P when workers that have read their slices up to `nexts` together read exactly positions 0..P-1; None when
    what they read has gaps (one worker a batch ahead of another), which no other worker count can continue."""
    total = sum(nexts)
    return total if nexts == _deal(total, len(nexts)) else None


def _remap_workers(state: dict, saved_workers: int, template: dict, workers: int, batches: int) -> dict | None:
    """The grain `state` of `saved_workers` workers, `batches` batches in, as a state of `workers` (shaped as
    `template`, a fresh state of the current stream) at the same position; None when there is none.

    Positions and mixup draws index the whole stream (grain seeds each example and each batch's draw by its
    place in it), so a position means the same with any worker count; but W workers read the stream round-robin,
    a batch at a time each, so a saved position is one for other workers only where the W had read exactly a
    prefix of it: after a multiple of W batches without a corrupt image skipped (0 or 1 worker: always).
    """
    try:
        positions, draws = zip(*(_worker_position(each) for each in _worker_states(state, saved_workers)))
        read = _prefix(list(positions))
        if draws[0] is not None:
            batches = _prefix(list(draws))
        if read is None or batches is None:
            return None
        new = [copy.deepcopy(each) for each in _worker_states(template, workers)]
        new_draws = _deal(batches, workers) if draws[0] is not None else [None] * len(new)
        for each, position, draw in zip(new, _deal(read, workers), new_draws, strict=True):
            if draw is None:
                each["next_index"] = position
            else:
                each["parent"]["next_index"], each["index_for_rng"] = position, draw
        if workers == 0:
            return new[0]
        return {**copy.deepcopy(template), "iterators_in_use_states": new, "next_index_in_cycle": batches % workers}
    except (KeyError, TypeError, ValueError, IndexError):  # a state of another shape: cannot be carried over
        return None


# The config field behind each identity key a user can change (`TrainIterator._check_identity`'s advice).
_IDENTITY_FIELDS = {"dataset": "dataset", "split": "train_split", "batch_size": "batch_size",
                    "image_size": "image_size", "shuffle_seed": "shuffle_seed", "mixup": "pp.mixup_alpha"}


def _saved_setting(key: str, value: Any) -> str:
    """The config setting a saved identity value stands for: 'config.batch_size=64'."""
    if key == "mixup":
        return "config.pp.mixup_alpha > 0" if value else "config.pp.mixup_alpha=0"
    return f"config.{_IDENTITY_FIELDS[key]}={value!r}"

# What a saved position means besides the identity: a change restarts the stream (`TrainIterator.set_state`).
POSITION_KEYS = {"split_size": "{} examples in config.train_split", "grain_version": "grain {}"}


class TrainIterator:
    """Infinite iterator of global train batches, `prefetch` of them placed on devices ahead of use.

    `get_state()` describes the position after the last batch returned (not the prefetched ones), so a run
    restored with `set_state` continues on exactly the next batch. `build(restart_step)` makes the grain stream;
    `restart_step` > 0 is a stream restarted at that step, with seeds of its own (`restart`).
    """

    def __init__(self, build: Callable[[int], grain.IterDataset], sharding: jax.sharding.Sharding, prefetch: int,
                 identity: dict, position_keys: dict, workers: int):
        self._build = build
        self._sharding = sharding
        self._prefetch = max(0, prefetch)
        self._identity = identity  # must match on restore
        self._position_keys = position_keys  # POSITION_KEYS' values now: a change restarts the stream
        self._workers = workers
        self._ahead: collections.deque = collections.deque()
        self._iterator = None
        self._open(0)
        self._batches = 0  # batches returned over the run: the step it is at

    def _open(self, restart_step: int, force: bool = False) -> None:
        """(Re)make the grain iterator for `restart_step`, unless it is already that one's (and not `force`)."""
        if self._iterator is not None and not force and restart_step == self._restart_step:
            return
        if self._iterator is not None:
            self._iterator.close()
        self._ahead.clear()
        self._iterator = iter(self._build(restart_step))
        self._restart_step = restart_step
        self._state = self._iterator.get_state()
        self._fresh_state = copy.deepcopy(self._state)  # the shape of this stream's states (`_remap_workers`)

    def __iter__(self) -> TrainIterator:
        return self

    def _fetch(self) -> None:
        batch = next(self._iterator)
        self._ahead.append((to_global(batch, self._sharding, DEVICE_KEYS), self._iterator.get_state()))

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._ahead) <= self._prefetch:
            self._fetch()
        batch, self._state = self._ahead.popleft()
        self._batches += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position: the grain state plus what must match on restore."""
        return {**self._identity, **self._position_keys, "data_workers": self._workers, "version": STATE_VERSION,
                "batches": self._batches, "restart_step": self._restart_step, "grain": self._state}

    def restart(self, step: int, reason: str) -> None:
        """Start the stream afresh for a run resuming at `step`, warning that the checkpoint's data position
        `reason` (completes "the checkpoint's data position ...").

        The shuffle, augmentation and mixup seeds are mixed with `step` (0: the first stream's): with the same
        seeds the run would see the examples and augmentations of steps 1..step again, in the same order. Every
        process restarting at one step gets the same seeds, and a run restarted at that step again the same stream.
        """
        logging.warning("the checkpoint's data position %s; the data order restarts at step %d, its seeds mixed "
                        "with the step", reason, step)
        self._open(step, force=True)
        self._batches = step

    def stream(self) -> list[int]:
        """[the step its stream was started at (0: the run's first), the batches taken]: what the processes of one
        run must agree on after resuming (each decides alone whether its saved position still holds), or they would
        draw the shared mixup weights of other steps."""
        return [self._restart_step, self._batches]

    def set_state(self, state: dict) -> bool:
        """Continue from a `get_state()` result of an iterator over the same data, batch and processes.

        True: at the saved position, also under another config.data_workers where that position exists for the
        current worker count (`_remap_workers`); or restarted (`restart`, with a warning naming what changed) when
        the split's length or grain's version changed (the same position would be other examples) or the
        position does not exist for the current worker count. States without those keys (older checkpoints)
        resume as before. False, and the stream starts afresh, when another version of this pipeline wrote
        `state` (an upgrade in the middle of a run): its positions name other examples here; the caller says so.
        Other settings are a `DatasetError`.
        """
        if state.get("version") != STATE_VERSION:
            if "batches" in state:
                self._open(int(state["batches"]), force=True)  # fresh seeds: see `restart`
                self._batches = int(state["batches"])
            return False
        self._check_identity(state)
        batches = self._saved_batches(state)
        reason = self._changed_meaning(state)
        if not reason:
            self._open(int(state.get("restart_step", 0)))  # the stream the positions are of
            grain_state, reason = self._for_workers(state, batches)
        if reason:
            self.restart(batches, reason)
            return True
        self._ahead.clear()
        try:
            self._iterator.set_state(grain_state)
        except (KeyError, TypeError, ValueError) as e:  # a state of another pipeline's shape
            raise DatasetError(f"cannot resume the data iterator exactly: its saved state does not fit this input "
                               f"pipeline ({type(e).__name__}: {e})") from e
        self._state = grain_state
        self._batches = batches
        return True

    def _changed_meaning(self, state: dict) -> str:
        """What of POSITION_KEYS `state` was saved with differs now (its positions are other examples), or ""."""
        changed = [f"{what.format(repr(state[key]))} (now {self._position_keys[key]!r})"
                   for key, what in POSITION_KEYS.items() if key in state and state[key] != self._position_keys[key]]
        return f"was saved with {' and '.join(changed)}" if changed else ""

    def _for_workers(self, state: dict, batches: int) -> tuple[dict | None, str]:
        """(The saved grain state for the current config.data_workers, "") or (None, why there is none)."""
        saved_workers = state.get("data_workers", self._workers)
        if saved_workers == self._workers:
            return state.get("grain"), ""  # a missing one fails in set_state: a DatasetError
        grain_state = _remap_workers(state["grain"], saved_workers, self._fresh_state, self._workers, batches)
        if grain_state is not None:
            return grain_state, ""
        return None, (f"was saved with config.data_workers={saved_workers} after step {batches}, where "
                      f"config.data_workers={self._workers} cannot continue exactly (the {saved_workers} workers "
                      f"read a batch each in turn: other counts continue only after a multiple of {saved_workers} "
                      "steps)")

    def _check_identity(self, state: dict) -> None:
        """Raise `DatasetError` naming the settings (saved, now) that differ from this iterator's."""
        saved = {key: state.get(key) for key in self._identity}
        if saved != self._identity:
            changed = {k: (saved[k], v) for k, v in self._identity.items() if saved[k] != v}
            saved_as = ", ".join(_saved_setting(k, saved[k]) for k in changed if k in _IDENTITY_FIELDS)
            raise DatasetError(f"cannot resume the data iterator exactly: its saved state was made with different "
                               f"settings (saved, now): {changed}; resume with the run's own settings"
                               + (f" ({saved_as})" if saved_as else "") + ", or start a new run from its weights: "
                               "another --workdir with --config.pretrained set to this one")

    def _saved_batches(self, state: dict) -> int:
        """The batches the saved run had taken: recorded, or (older states) estimated from the positions read."""
        if "batches" in state:
            return int(state["batches"])
        rows = self._identity["batch_size"] // self._identity["process_count"]
        try:
            workers = state.get("data_workers", self._workers)
            return sum(_worker_position(each)[0] for each in _worker_states(state["grain"], workers)) // rows
        except (KeyError, TypeError, ValueError):
            return 0

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
    source, _ = _open_train_split(config, process_count)
    identity = {"dataset": config.dataset, "split": config.train_split, "batch_size": config.batch_size,
                "image_size": config.image_size, "shuffle_seed": config.shuffle_seed,
                "mixup": config.pp.mixup_alpha > 0,  # a step of its own in the pipeline, with its own state
                "process_index": process_index, "process_count": process_count}
    position_keys = {"split_size": len(source), "grain_version": grain.__version__}

    def build(restart_step: int) -> grain.IterDataset:
        return _train_stream(config, source, process_index, process_count, restart_step)

    return TrainIterator(build, batch_sharding, config.prefetch_batches, identity, position_keys,
                         config.data_workers)


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
