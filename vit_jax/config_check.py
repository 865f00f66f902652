"""Validate a run config before anything is compiled: each error names the field, the value, and what is valid."""

from __future__ import annotations

import math
import numbers
import re

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_jax.errors import UserError
from vit_jax.models.variants import embedding_patch, parse_variant, resnet_stride

CLASSIFIERS = ("token", "gap")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("linear", "cosine")
LABEL_KINDS = ("single", "multi")
PRETRAINED_HEADS = ("reset", "keep")
MESH_AXES = ("data", "fsdp", "model")


class ConfigError(UserError, ValueError):
    """A config that cannot work; the message names the field, its value and what would be valid."""


def _fail(field: str, value, valid: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is invalid: {valid}")


def _dotted(config: ml_collections.ConfigDict, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def positive_int(config: ml_collections.ConfigDict, field: str, prefix: str = "") -> int:
    """`config.<field>` (dotted), if a positive integer; else a ConfigError naming it as `config.<prefix><field>`:
    `prefix` is where `config` sits in the run config ("model." for `config.model`)."""
    value = _dotted(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(prefix + field, value, "expected a positive integer")
    return value


def dataset_name(dataset: str) -> str:
    """What metrics of a dataset are named after: its TFDS name and config without the version
    (`cifar10_corrupted/fog_5:1.0.0` -> `cifar10_corrupted/fog_5`), so the configs of one dataset are told apart;
    a namespace stays (`huggingface:beans`)."""
    return re.sub(r":[\d*]+(\.[\d*]+)*$", "", dataset)


def dataset_entries(value, field: str, parts: tuple[str, ...], example: str) -> list[tuple[str, ...]]:
    """Entries of a dataset-list field (`extra_evals`, `fewshot.datasets`): each a tuple of `parts` strings or
    one comma-separated string (what `--config.<field>=a,b` gives); a dataset (its name and config, whatever the
    version) at most once, as metrics are named after it."""
    entries = (value,) if isinstance(value, str) else tuple(value)
    if len(entries) == len(parts) and all(isinstance(e, str) and "," not in e for e in entries):
        count = {2: "two", 3: "three"}.get(len(parts), str(len(parts)))
        _fail(field, entries, f"it reads as {count} datasets; one ({', '.join(parts)}) entry is written "
              f"{(entries,)!r} or {','.join(entries)!r}")
    parsed = []
    for entry in entries:
        fields = tuple(p.strip() for p in entry.split(",")) if isinstance(entry, str) else tuple(entry)
        if len(fields) != len(parts) or not all(isinstance(f, str) and f for f in fields):
            none = (f"; for none, --config.{field}='()'" if isinstance(entry, str) and not entry.strip() else "")
            raise ConfigError(f"config.{field} entry {entry!r} is invalid: expected ({', '.join(parts)}), "
                              f"e.g. {example}{none}")
        parsed.append(fields)
    names = [dataset_name(fields[0]) for fields in parsed]
    if len(set(names)) != len(names):
        _fail(field, entries, f"each dataset may appear once (its metrics are named after it: {names})")
    return parsed


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes of the (data, fsdp, model) axes, with the one -1 entry given all remaining devices."""
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
            _fail(f"mesh.{axis}", size, "expected a positive integer or -1 (all remaining devices)")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        _fail(f"mesh.{free[1]}", -1, f"only one mesh axis may be -1, but {free} all are")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
        _fail("mesh", dict(sizes), f"the fixed axis sizes multiply to {fixed}, which does not divide the "
              f"{num_devices} available devices")
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        _fail("mesh", dict(sizes), f"the axis sizes multiply to {fixed} but there are {num_devices} devices; "
              "set one axis to -1 or make the product equal the device count")
    return sizes


def _check_variant(model: ml_collections.ConfigDict) -> None:
    """`model.variant` names the architecture (summaries, plans): a paper variant whose numbers the fields hold,
    or "custom". Overriding the label alone would build one model and report another."""
    variant = model.get("variant", "custom")
    if variant == "custom":
        return
    try:
        numbers = parse_variant(variant)
    except ValueError as e:
        raise ConfigError(f"config.model.variant={variant!r} is invalid: {e}, or 'custom'") from None
    expected = {"hidden_size": numbers.hidden_size, "num_layers": numbers.num_layers, "num_heads": numbers.num_heads,
                "mlp_dim": numbers.mlp_dim, "patch_size": numbers.patch_size,
                "resnet_layers": tuple(numbers.resnet_layers or ())}
    if numbers.resnet_layers:
        expected["resnet_width"] = 1  # BiT's width multiplier: the paper's hybrids use the plain ResNet
    actual = {field: tuple(model[field] or ()) if field == "resnet_layers" else model.get(field) for field in expected}
    differ = [f"{field}={actual[field]!r} ({variant}: {want!r})" for field, want in expected.items()
              if actual[field] != want]
    if differ:
        raise ConfigError(
            f"config.model.variant={variant!r} does not match the architecture fields: {', '.join(differ)}. "
            "A config file's argument picks the variant (e.g. --config=configs/common.py:L/16 or "
            "--config=configs/finetune.py:cifar10,L/16); to set sizes field by field, also pass "
            "--config.model.variant=custom")


def image_size_problem(image_size: object, patch_size: int) -> str | None:
    """What is wrong with `image_size` for patches of `patch_size` (it must be a whole number of them: the patch
    embedding would drop the edge pixels), or None."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size <= 0:
        return "expected a positive integer"
    if image_size % patch_size:
        below = image_size // patch_size * patch_size
        nearest = ([below] if below else []) + [below + patch_size]
        return f"must be divisible by model.patch_size={patch_size} (the nearest are {' and '.join(map(str, nearest))})"
    return None


def validate_model(model: ml_collections.ConfigDict, image_size: int) -> None:
    """Architecture checks: sizes, heads, the variant label, patch vs image size, classifier, dtype."""
    for field in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size"):
        positive_int(model, field, prefix="model.")
    if model.hidden_size % model.num_heads:
        _fail("model.num_heads", model.num_heads, f"must divide model.hidden_size={model.hidden_size}")
    if model.classifier not in CLASSIFIERS:
        _fail("model.classifier", model.classifier, f"expected one of {CLASSIFIERS}")
    if model.get("axial", False) and model.classifier != "gap":
        _fail("model.classifier", model.classifier, "an axial model (model.axial=True) has no class token: "
              "set model.classifier='gap'")
    if model.dtype not in DTYPES:
        _fail("model.dtype", model.dtype, f"expected one of {DTYPES}")
    if not 0 < model.layernorm_epsilon < math.inf:
        _fail("model.layernorm_epsilon", model.layernorm_epsilon,
              "expected a small positive number (1e-6: the paper's code and timm; HF uses 1e-12)")
    if not math.isfinite(model.head_bias_init):
        _fail("model.head_bias_init", model.head_bias_init, "expected a finite number (0; big_vision's sigmoid "
              "pre-training uses -10)")
    if isinstance(model.representation_size, bool) or not isinstance(model.representation_size, int) \
            or model.representation_size < 0:
        _fail("model.representation_size", model.representation_size, "expected 0 (none) or a positive integer")
    for field in ("dropout_rate", "attention_dropout_rate", "stochastic_depth"):
        if not 0.0 <= model[field] < 1.0:
            _fail(f"model.{field}", model[field], "expected a rate in [0, 1)")
    if model.resnet_layers:
        if any(not isinstance(n, int) or n <= 0 for n in model.resnet_layers):
            _fail("model.resnet_layers", model.resnet_layers, "expected positive units per stage, e.g. (3, 4, 9)")
        if isinstance(model.resnet_width, bool) or not isinstance(model.resnet_width, int) or model.resnet_width <= 0:
            _fail("model.resnet_width", model.resnet_width, "expected a positive integer width multiplier (1: BiT-R50)")
        try:
            embedding_patch(model.patch_size, tuple(model.resnet_layers))
        except ValueError:
            stride = resnet_stride(tuple(model.resnet_layers))
            _fail("model.patch_size", model.patch_size,
                  f"a hybrid with {len(model.resnet_layers)} ResNet stages needs a multiple of its stride {stride}")
    problem = image_size_problem(image_size, model.patch_size)
    if problem:
        _fail("image_size", image_size, problem)
    _check_variant(model)


def interval(every: int, num_steps: int) -> int:
    """Steps between evaluations or checkpoints: `every`, or a tenth of the run's `num_steps` (rounded up) for 0."""
    return every or max(1, math.ceil(num_steps / 10))


def check_duration_flags(config: ml_collections.ConfigDict, num_epochs_given: bool) -> None:
    """A `--config.num_epochs` given on the command line must set the run's length: with `total_steps` > 0 it
    would be ignored."""
    if num_epochs_given and config.total_steps > 0:
        _fail("num_epochs", config.num_epochs, f"it has no effect while config.total_steps={config.total_steps} "
              "sets the run's length: add --config.total_steps=0 to train by epochs")


def adopt_recorded_label_kind(config: ml_collections.ConfigDict, recorded: dict, where: str) -> None:
    """Set `config.label_kind` to the kind the run config `recorded` (a dict) trained with, if it names a valid
    one that differs, with a warning: a sigmoid run's logits read through a softmax (or the reverse) rank the same
    but give another loss and other probabilities."""
    trained_kind = recorded.get("label_kind")
    if trained_kind in LABEL_KINDS and trained_kind != config.label_kind:
        logging.warning("%s was trained with label_kind=%r: its loss and probabilities are computed as such, not as "
                        "this config's %r", where, trained_kind, config.label_kind)
        config.label_kind = trained_kind


def validate_label_kind(config: ml_collections.ConfigDict) -> None:
    """`config.label_kind` is "single" (softmax) or "multi" (sigmoid); predict checks it alone too."""
    if config.label_kind not in LABEL_KINDS:
        _fail("label_kind", config.label_kind, f"expected one of {LABEL_KINDS}")


def _non_negative_int(config: ml_collections.ConfigDict, field: str, zero: str) -> None:
    value = _dotted(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(field, value, f"expected an integer >= 0 ({zero})")


def validate_eval_crop(pp: ml_collections.ConfigDict) -> None:
    """Check what evaluation, predict and visualize crop: `pp.eval_crop_fraction` of each side."""
    if isinstance(pp.eval_crop_fraction, bool) or not 0.0 < pp.eval_crop_fraction <= 1.0:
        _fail("pp.eval_crop_fraction", pp.eval_crop_fraction, "expected the fraction of each side kept, in (0, 1] "
              "(1: the whole image)")


def validate_preprocessing(config: ml_collections.ConfigDict) -> None:
    """Check `config.pp` and the data order's seed before any image is read: a bad value would otherwise turn an
    augmentation off in silence, or fail in a loader thread (or at the first evaluation, hours in)."""
    pp = config.pp
    area = pp.crop_min_area  # a float field: the config refuses other types
    if not 0.0 < area <= 1.0:
        percent = f"; big_vision's inception_crop(area_min={area:g}) is in percent: write {area / 100:g}" if (
            1.0 < area <= 100.0) else ""
        _fail("pp.crop_min_area", area, f"expected the smallest crop's fraction of the image area, in (0, 1]{percent}")
    validate_eval_crop(pp)
    if isinstance(pp.mixup_alpha, bool) or not 0.0 <= pp.mixup_alpha < math.inf:  # also refuses nan
        _fail("pp.mixup_alpha", pp.mixup_alpha, "expected a Beta(alpha, alpha) parameter >= 0 (0: no mixup), finite")
    if isinstance(pp.randaugment_magnitude, bool) or not 0 <= pp.randaugment_magnitude < math.inf:
        _fail("pp.randaugment_magnitude", pp.randaugment_magnitude,
              "expected a magnitude >= 0 (AugReg uses 10-20), finite")
    _non_negative_int(config, "pp.randaugment_layers", "0: no RandAugment")
    _non_negative_int(config, "pp.random_translate", "0: no shift")
    if pp.random_translate >= config.image_size:
        _fail("pp.random_translate", pp.random_translate, f"expected fewer pixels than image_size={config.image_size} "
              "(a shift by the whole side leaves no pixel of the image)")
    _non_negative_int(config, "data_workers", "0: load in the main process")
    _non_negative_int(config, "prefetch_batches", "0: none ahead")
    if isinstance(config.shuffle_seed, bool) or not isinstance(config.shuffle_seed, int):
        _fail("shuffle_seed", config.shuffle_seed, "expected an integer")


def check_mixup_rows(config: ml_collections.ConfigDict, process_count: int | None = None) -> None:
    """Refuse mixup with fewer than 2 rows per process: the pipeline mixes each row with another row of its own
    process's batch (`np.roll` over batch_size / process_count rows), so a single row is mixed with itself and
    mixup would do nothing, in silence. `process_count` None: `jax.process_count()`, asked only with mixup on
    (it starts jax's backend)."""
    if not config.pp.mixup_alpha > 0:
        return
    process_count = jax.process_count() if process_count is None else process_count
    rows = config.batch_size // process_count
    if rows < 2:
        _fail("pp.mixup_alpha", config.pp.mixup_alpha,
              f"mixup pairs the rows of each process's batch, and config.batch_size={config.batch_size} over "
              f"{process_count} processes leaves {rows} row per process (mixup would do nothing); use "
              f"batch_size >= {2 * process_count} or pp.mixup_alpha=0")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int | None = None
             ) -> dict[str, int]:
    """Check a whole run config against `num_devices`; returns the resolved mesh shape.

    `process_count` (the processes loading the data; None: `jax.process_count()`, this job's) decides the rows
    of each process's batch, which mixup needs at least 2 of.
    """
    validate_model(config.model, config.image_size)
    validate_preprocessing(config)
    positive_int(config, "num_classes")
    validate_label_kind(config)
    if config.pretrained_head not in PRETRAINED_HEADS:
        _fail("pretrained_head", config.pretrained_head, f"expected one of {PRETRAINED_HEADS}")
    if config.optimizer.name not in OPTIMIZERS:
        _fail("optimizer.name", config.optimizer.name, f"expected one of {OPTIMIZERS}")
    if config.optimizer.schedule not in SCHEDULES:
        _fail("optimizer.schedule", config.optimizer.schedule, f"expected one of {SCHEDULES}")
    opt = config.optimizer
    if not 0 < opt.lr < math.inf:
        _fail("optimizer.lr", opt.lr, "expected a positive learning rate (finite)")
    for field, what in (("weight_decay", "a decay >= 0 (0: none)"), ("grad_clip_norm", "a norm >= 0 (0: no clipping)")):
        if not 0 <= opt[field] < math.inf:  # also refuses nan
            _fail(f"optimizer.{field}", opt[field], f"expected {what}, finite")
    # jax's PRNGKey keeps a seed's low 32 bits (without x64): 2**32 was seed 0 again, -1 was 2**32 - 1.
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        _fail("seed", config.seed, "expected an integer in [0, 2**32)")
    _non_negative_int(config, "profile_steps", "0: no profile")
    for field in ("b1", "b2", "momentum", "label_smoothing", "ema_decay"):
        if not 0.0 <= opt[field] < 1.0:
            _fail(f"optimizer.{field}", opt[field], "expected a value in [0, 1)")
    # Adam's moments and the Polyak average run in float32, where a decay within ~3e-8 of 1 is 1: Adam's bias
    # correction 1 - b^t would be 0 and the average's weight (1 - d) / (1 - d^t) 0 / 0.
    for field in ("b1", "b2", "ema_decay"):
        if np.float32(opt[field]) >= 1.0:
            _fail(f"optimizer.{field}", opt[field], "it rounds to 1 in float32, where it is used (Adam's bias "
                  "correction and the Polyak average divide by 1 - decay^step, which would be 0): expected a value "
                  "that stays below 1 in float32, e.g. at most 0.9999999")
    if not 0.0 < opt.layer_decay <= 1.0:
        _fail("optimizer.layer_decay", opt.layer_decay, "expected a factor in (0, 1] (1: one rate for every layer)")
    if not isinstance(opt.freeze, str):
        _fail("optimizer.freeze", opt.freeze, "expected a regular expression over parameter paths ('' for none)")
    try:
        re.compile(opt.freeze)
    except re.error as e:
        _fail("optimizer.freeze", opt.freeze, f"expected a regular expression over parameter paths ({e})")
    if config.model.scan and "encoderblock_" in opt.freeze:
        _fail("optimizer.freeze", opt.freeze, "names single blocks, but with model.scan the blocks are one stacked "
              "Transformer/encoderblock/... (all frozen or none): set model.scan=False to freeze some of them")
    for field in ("batch_size", "eval_batch_size", "accum_steps", "log_every", "keep_checkpoints"):
        positive_int(config, field)
    for field in ("eval_every", "checkpoint_every"):
        _non_negative_int(config, field, "0: every tenth of the run")
    check_mixup_rows(config, process_count)
    if config.total_steps < 0 or (config.total_steps == 0 and config.num_epochs <= 0):
        _fail("total_steps", config.total_steps, "expected a positive step count, or 0 with num_epochs > 0")
    mesh = resolve_mesh_shape(config.mesh, num_devices)
    batch_devices = mesh["data"] * mesh["fsdp"]
    if config.batch_size % config.accum_steps:
        _fail("batch_size", config.batch_size, f"must be divisible by accum_steps={config.accum_steps}")
    micro_batch = config.batch_size // config.accum_steps
    if micro_batch % batch_devices:
        _fail("batch_size", config.batch_size,
              f"each micro-batch (batch_size / accum_steps = {micro_batch}) must split evenly over the "
              f"{batch_devices} data x fsdp devices; use a multiple of {batch_devices * config.accum_steps}")
    if config.eval_batch_size % batch_devices:
        _fail("eval_batch_size", config.eval_batch_size,
              f"must split evenly over the {batch_devices} data x fsdp devices; use a multiple of {batch_devices}")
    if config.model.num_heads % mesh["model"]:
        _fail("mesh.model", mesh["model"], f"tensor parallelism must divide model.num_heads={config.model.num_heads}")
    if config.model.hidden_size % mesh["fsdp"]:  # FSDP splits every kernel along its hidden_size dimension
        divisors = [d for d in range(2, mesh["fsdp"]) if config.model.hidden_size % d == 0 and mesh["fsdp"] % d == 0]
        _fail("mesh.fsdp", mesh["fsdp"], f"must divide model.hidden_size={config.model.hidden_size}, or FSDP splits "
              "none of the transformer's parameters (each chip would hold them whole); use "
              f"{'one of ' + str(divisors[-3:]) if divisors else 'a divisor of it'} and put the other devices on "
              "mesh.data")
    if "fewshot" in config:
        from vit_jax import fewshot  # it imports this module

        fewshot.validate(config)
    from vit_jax import extra_evals  # it imports this module

    extra_evals.validate(config)
    return mesh
