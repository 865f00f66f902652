"""Every shipped config loads and validates; each config that cannot work is a clear error (exit code 2)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_flags

from configs import common
from vit_jax.config_check import ConfigError, check_duration_flags, interval, resolve_mesh_shape, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# No huge-page re-exec of each command (vit_jax.hugepages, tested in test_hugepages.py): 0.6-1.5 s each.
NO_REEXEC = {**os.environ, "VIT_JAX_HUGEPAGES": "0"}
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def load(name):
    return config_flags.config_flags._ConfigFileParser("config").parse(str(ROOT / "configs" / name))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_config_validates(name):
    config = load(name)
    mesh = validate(config, num_devices=8)
    assert mesh["data"] * mesh["fsdp"] * mesh["model"] == 8


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_a_shipped_config_measures_its_run_in_steps_or_epochs_not_both(name):
    config = load(name)
    assert (config.total_steps > 0) != (config.num_epochs > 0), (config.total_steps, config.num_epochs)


def test_num_epochs_given_to_a_run_measured_in_steps_is_refused():
    config = base()
    config.total_steps, config.num_epochs = 100, 3
    check_duration_flags(config, num_epochs_given=False)  # the config file's own value: total_steps decides
    with pytest.raises(ConfigError, match=r"config.num_epochs=3 is invalid: it has no effect while "
                                          r"config.total_steps=100 sets the run's length: add --config.total_steps=0"):
        check_duration_flags(config, num_epochs_given=True)
    config.total_steps = 0
    check_duration_flags(config, num_epochs_given=True)


def test_main_refuses_num_epochs_that_total_steps_would_override(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vit_jax.main", "--config=configs/demo.py", "--config.num_epochs=3",
                             f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=NO_REEXEC)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: config.num_epochs=3 is invalid: it has no effect while config.total_steps=1500 sets the run's "
        "length: add --config.total_steps=0 to train by epochs"], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_interval_of_0_is_each_tenth_of_the_run():
    assert [interval(0, n) for n in (1, 9, 10, 11, 500, 20_000)] == [1, 1, 1, 2, 50, 2000]
    assert interval(7, 500) == 7
    config = base()
    config.eval_every = -1
    with pytest.raises(ConfigError, match=r"config.eval_every=-1 is invalid: expected an integer >= 0 \(0: every "
                                          r"tenth of the run\)"):
        validate(config, num_devices=8)


def test_every_model_config_is_pinned():
    from tests.test_vit import PINNED

    variants = {load(name).model.variant for name in CONFIG_FILES} - {"custom"}
    assert variants <= set(PINNED), variants - set(PINNED)


def base():
    return common.get_config("B/16")


@pytest.mark.parametrize("mutate, field, hint", [
    (lambda c: setattr(c, "image_size", 225), "image_size", "divisible by model.patch_size=16 (the nearest are 224 "
     "and 240)"),
    (lambda c: setattr(c.model, "variant", "L/16"), "model.variant", "hidden_size=768 (L/16: 1024)"),
    (lambda c: setattr(c.model, "variant", "X/16"), "model.variant", "or 'custom'"),
    (lambda c: setattr(c.model, "mlp_dim", 1024), "model.variant", "mlp_dim=1024 (B/16: 3072)"),
    (lambda c: setattr(c.model, "resnet_layers", (3, 4, 9)), "model.variant", "resnet_layers=(3, 4, 9) (B/16: ())"),
    (lambda c: setattr(c.model, "axial", True), "model.classifier", "set model.classifier='gap'"),
    (lambda c: (setattr(c.model, "variant", "R50+B/16"), setattr(c.model, "resnet_layers", (3, 4, 9)),
                setattr(c.model, "resnet_width", 2)), "model.variant", "resnet_width=2 (R50+B/16: 1)"),
    (lambda c: setattr(c.model, "classifier", "cls"), "model.classifier", "'token', 'gap'"),
    (lambda c: setattr(c, "batch_size", 4100), "batch_size", "multiple of 8"),
    (lambda c: setattr(c.model, "num_heads", 5), "model.num_heads", "must divide model.hidden_size=768"),
    (lambda c: setattr(c.model, "dtype", "float64"), "model.dtype", "bfloat16"),
    (lambda c: setattr(c.optimizer, "name", "lamb"), "optimizer.name", "'adam', 'sgd'"),
    (lambda c: setattr(c.mesh, "fsdp", 3), "mesh", "does not divide the 8 available devices"),
    (lambda c: setattr(c.mesh, "fsdp", -1), "mesh.fsdp", "only one mesh axis may be -1"),
    (lambda c: setattr(c, "label_kind", "multilabel"), "label_kind", "'single', 'multi'"),
    (lambda c: setattr(c, "pretrained_head", "zero"), "pretrained_head", "'reset', 'keep'"),
    (lambda c: setattr(c, "accum_steps", 3), "batch_size", "accum_steps=3"),
    (lambda c: (setattr(c.model, "resnet_layers", (3, 4, 9)), setattr(c.model, "patch_size", 8)),
     "model.patch_size", "stride 16"),
    # Each hint below is the whole message from the field on: the field, its bad value and what is valid.
    (lambda c: setattr(c.model, "dropout_rate", 1.0), "model.dropout_rate",
     "config.model.dropout_rate=1.0 is invalid: expected a rate in [0, 1)"),
    (lambda c: setattr(c.model, "dropout_rate", -0.1), "model.dropout_rate",
     "config.model.dropout_rate=-0.1 is invalid: expected a rate in [0, 1)"),
    (lambda c: setattr(c.model, "attention_dropout_rate", 1.5), "model.attention_dropout_rate",
     "config.model.attention_dropout_rate=1.5 is invalid: expected a rate in [0, 1)"),
    (lambda c: setattr(c.model, "stochastic_depth", -0.5), "model.stochastic_depth",
     "config.model.stochastic_depth=-0.5 is invalid: expected a rate in [0, 1)"),
    (lambda c: setattr(c.model, "stochastic_depth", float("nan")), "model.stochastic_depth",
     "config.model.stochastic_depth=nan is invalid: expected a rate in [0, 1)"),
    (lambda c: setattr(c.model, "representation_size", -1), "model.representation_size",
     "config.model.representation_size=-1 is invalid: expected 0 (none) or a positive integer"),
    (lambda c: (setattr(c.model, "variant", "custom"), setattr(c.model, "resnet_layers", (3, 0, 9))),
     "model.resnet_layers", "config.model.resnet_layers=(3, 0, 9) is invalid: expected positive units per stage"),
    (lambda c: setattr(c.optimizer, "schedule", "step"), "optimizer.schedule",
     "config.optimizer.schedule='step' is invalid: expected one of ('linear', 'cosine')"),
    (lambda c: setattr(c.optimizer, "lr", 0.0), "optimizer.lr",
     "config.optimizer.lr=0.0 is invalid: expected a positive learning rate"),
    (lambda c: setattr(c.optimizer, "lr", -0.001), "optimizer.lr",
     "config.optimizer.lr=-0.001 is invalid: expected a positive learning rate"),
    (lambda c: setattr(c, "total_steps", -5), "total_steps",
     "config.total_steps=-5 is invalid: expected a positive step count, or 0 with num_epochs > 0"),
    (lambda c: setattr(c, "num_epochs", 0), "total_steps",
     "config.total_steps=0 is invalid: expected a positive step count, or 0 with num_epochs > 0"),
    (lambda c: setattr(c.mesh, "model", 8), "mesh.model",  # B/16 has 12 heads; 8 divides the 8 devices
     "config.mesh.model=8 is invalid: tensor parallelism must divide model.num_heads=12"),
    (lambda c: (setattr(c.mesh, "data", 2), setattr(c.mesh, "fsdp", 2)), "mesh",
     "config.mesh={'data': 2, 'fsdp': 2, 'model': 1} is invalid: the axis sizes multiply to 4 but there are 8 "
     "devices"),
    (lambda c: setattr(c.mesh, "model", 0), "mesh.model",
     "config.mesh.model=0 is invalid: expected a positive integer or -1"),
    (lambda c: setattr(c.mesh, "data", -2), "mesh.data",
     "config.mesh.data=-2 is invalid: expected a positive integer or -1"),
    (lambda c: (setattr(c.model, "variant", "custom"), setattr(c.model, "resnet_layers", (3, 4, 9)),
                setattr(c.model, "resnet_width", 0)), "model.resnet_width",
     "config.model.resnet_width=0 is invalid: expected a positive integer width multiplier"),
    (lambda c: setattr(c.optimizer, "weight_decay", -0.1), "optimizer.weight_decay",
     "config.optimizer.weight_decay=-0.1 is invalid: expected a decay >= 0 (0: none)"),
    (lambda c: setattr(c.optimizer, "grad_clip_norm", -1.0), "optimizer.grad_clip_norm",
     "config.optimizer.grad_clip_norm=-1.0 is invalid: expected a norm >= 0 (0: no clipping)"),
    (lambda c: setattr(c.optimizer, "label_smoothing", 1.5), "optimizer.label_smoothing",
     "config.optimizer.label_smoothing=1.5 is invalid: expected a value in [0, 1)"),
    (lambda c: setattr(c.optimizer, "momentum", 1.5), "optimizer.momentum",
     "config.optimizer.momentum=1.5 is invalid: expected a value in [0, 1)"),
    (lambda c: setattr(c.optimizer, "b2", 1.0), "optimizer.b2",
     "config.optimizer.b2=1.0 is invalid: expected a value in [0, 1)"),
    (lambda c: setattr(c.optimizer, "b1", float("nan")), "optimizer.b1",
     "config.optimizer.b1=nan is invalid: expected a value in [0, 1)"),
    (lambda c: setattr(c.pp, "crop_min_area", 5.0), "pp.crop_min_area",
     "config.pp.crop_min_area=5.0 is invalid: expected the smallest crop's fraction of the image area, in (0, 1]; "
     "big_vision's inception_crop(area_min=5) is in percent: write 0.05"),
    (lambda c: setattr(c.pp, "crop_min_area", float("nan")), "pp.crop_min_area",
     "config.pp.crop_min_area=nan is invalid: expected the smallest crop's fraction of the image area, in (0, 1]"),
    (lambda c: setattr(c.pp, "crop_min_area", -0.1), "pp.crop_min_area", "in (0, 1]"),
    (lambda c: setattr(c.pp, "eval_crop_fraction", 0.0), "pp.eval_crop_fraction",
     "config.pp.eval_crop_fraction=0.0 is invalid: expected the fraction of each side kept, in (0, 1] (1: the "
     "whole image)"),
    (lambda c: setattr(c.pp, "eval_crop_fraction", 1.14), "pp.eval_crop_fraction", "in (0, 1]"),
    (lambda c: setattr(c.pp, "mixup_alpha", -0.2), "pp.mixup_alpha",
     "config.pp.mixup_alpha=-0.2 is invalid: expected a Beta(alpha, alpha) parameter >= 0 (0: no mixup)"),
    (lambda c: setattr(c.pp, "randaugment_layers", -2), "pp.randaugment_layers",
     "config.pp.randaugment_layers=-2 is invalid: expected an integer >= 0 (0: no RandAugment)"),
    (lambda c: setattr(c.pp, "randaugment_magnitude", -10), "pp.randaugment_magnitude", "a magnitude >= 0"),
    (lambda c: setattr(c.pp, "random_translate", -4), "pp.random_translate",
     "config.pp.random_translate=-4 is invalid: expected an integer >= 0 (0: no shift)"),
    (lambda c: setattr(c, "seed", 2**32), "seed", "expected an integer in [0, 2**32)"),  # was seed 0's key
    (lambda c: setattr(c, "profile_steps", -5), "profile_steps", "expected an integer >= 0 (0: no profile)"),
    (lambda c: setattr(c.optimizer, "lr", float("inf")), "optimizer.lr", "expected a positive learning rate (finite)"),
    (lambda c: setattr(c.pp, "mixup_alpha", float("inf")), "pp.mixup_alpha", "(0: no mixup), finite"),
    (lambda c: setattr(c.model, "layernorm_epsilon", 0.0), "model.layernorm_epsilon", "a small positive number"),
    (lambda c: setattr(c.model, "head_bias_init", float("nan")), "model.head_bias_init", "a finite number"),
    (lambda c: setattr(c.pp, "random_translate", 224), "pp.random_translate",
     "config.pp.random_translate=224 is invalid: expected fewer pixels than image_size=224"),
    (lambda c: setattr(c, "data_workers", -1), "data_workers", "an integer >= 0 (0: load in the main process)"),
    (lambda c: setattr(c, "prefetch_batches", -1), "prefetch_batches", "an integer >= 0 (0: none ahead)"),
    (lambda c: (setattr(c.model, "variant", "custom"), setattr(c.model, "hidden_size", 36),
                setattr(c.model, "num_heads", 6), setattr(c.mesh, "fsdp", 8)), "mesh.fsdp",
     "config.mesh.fsdp=8 is invalid: must divide model.hidden_size=36, or FSDP splits none of the transformer's "
     "parameters (each chip would hold them whole); use one of [2, 4] and put the other devices on mesh.data"),
])
def test_bad_config_names_field_value_and_valid_choices(mutate, field, hint):
    config = base()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=8)
    assert f"config.{field}=" in str(err.value)
    assert hint in str(err.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size"])
def test_a_model_size_that_is_no_positive_integer_is_named_with_its_model_prefix(field):
    config = base()
    config.model[field] = 0
    with pytest.raises(ConfigError, match=rf"^config.model.{field}=0 is invalid: expected a positive integer$"):
        validate(config, num_devices=8)


@pytest.mark.parametrize("field", ["b1", "b2", "ema_decay"])
def test_a_decay_that_rounds_to_1_in_float32_is_refused(field):
    """0.99999999 < 1 in float64 but is 1.0 in float32, where Adam's bias correction and the Polyak average's
    weight (1 - d) / (1 - d^t) divide by 0: the average was nan from its first step."""
    from vit_jax import optim

    assert np.isnan(float(optim.ema_weight(0.99999999, 1))) and float(optim.ema_weight(0.9999999, 1)) == 1.0
    config = base()
    config.optimizer[field] = 0.99999999
    with pytest.raises(ConfigError, match=rf"^config.optimizer.{field}=0.99999999 is invalid: it rounds to 1 in "
                                          r"float32.*at most 0.9999999$"):
        validate(config, num_devices=8)
    config.optimizer[field] = 0.9999999  # float32 0.99999988
    validate(config, num_devices=8)


def test_randaugment_magnitude_takes_fractions_from_the_command_line():
    result = subprocess.run([sys.executable, "-c", "import sys; from absl import flags; from ml_collections import "
                             "config_flags; config_flags.DEFINE_config_file('config', None, lock_config=True); "
                             "flags.FLAGS(sys.argv); print(flags.FLAGS.config.pp.randaugment_magnitude)",
                             "--config=configs/vit_b16.py", "--config.pp.randaugment_magnitude=9.5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "9.5", result.stderr[-2000:]


def test_custom_sizes_validate_and_a_variants_own_numbers_match_it():
    config = base()
    config.model.variant, config.model.mlp_dim = "custom", 1024
    validate(config, num_devices=8)
    config = common.get_config("R50+B/16")  # the hybrid's ResNet stages are part of its variant
    validate(config, num_devices=8)


def test_mixup_with_one_row_per_process_is_refused_naming_batch_size_and_process_count():
    """Mixup pairs rows within each process's batch: one row per process would be mixed with itself."""
    config = base()
    config.batch_size, config.pp.mixup_alpha = 8, 0.2
    with pytest.raises(ConfigError, match=r"config.pp.mixup_alpha=0.2 is invalid: .*config.batch_size=8 over 8 "
                                          r"processes leaves 1 row per process .*use batch_size >= 16 or "
                                          r"pp.mixup_alpha=0"):
        validate(config, num_devices=8, process_count=8)
    validate(config, num_devices=8, process_count=4)  # 2 rows each
    validate(config, num_devices=8)  # this test's one process
    config.pp.mixup_alpha = 0.0
    validate(config, num_devices=8, process_count=8)  # no mixup: a row each is fine


def test_unknown_variant_is_clear():
    with pytest.raises(ValueError, match="unknown variant 'B/15'.*valid"):
        common.get_config("B/15")


def test_mesh_minus_one_takes_the_rest():
    config = base()
    config.mesh.fsdp = 2
    assert resolve_mesh_shape(config.mesh, 8) == {"data": 4, "fsdp": 2, "model": 1}


@pytest.mark.parametrize("override, message", [
    ("--config.image_size=225", "config.image_size=225 is invalid"),
    ("--config.modle.x=3", "unknown config field"),
    ("--config.batchsize=32",
     "unknown config field 'batchsize' in --config.batchsize=32 (did you mean \"batch_size\")"),
    ("--config.image_size=abc", "flag --config.image_size=abc: expected an integer"),
    ("--config.batch_size=12.5", "flag --config.batch_size=12.5: expected an integer"),
    ("--config.pp.flip=yes", "flag --config.pp.flip=yes: expected true or false"),
    ("--config.optimizer.lr=fast", "flag --config.optimizer.lr=fast: expected a number"),
    ("stray", "unexpected arguments ['stray']: pass options as --flag=value"),
    ("--config.model.classifier=cls", "config.model.classifier='cls' is invalid"),
    ("--config.model.patch_size=0", "error: config.model.patch_size=0 is invalid: expected a positive integer"),
])
def test_command_line_bad_input_is_one_line_and_exit_2(override, message):
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.summary", "--config=configs/vit_b16.py", override],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=NO_REEXEC)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/no_such.py"], "flag --config=configs/no_such.py: no such config file"),
    (["--config=configs/no_such.py", "--config.batch_size=8"], "configs/{common.py,demo.py,"),
    (["--config", "configs/no_such.py"], "flag --config=configs/no_such.py: no such config file"),
    (["--config=configs/finetune.py:cifar11"],
     "flag --config=configs/finetune.py:cifar11: configs/finetune.py: unknown dataset 'cifar11'; valid: ['cifar10',"),
    (["--config=configs/demo.py:foo"], "TypeError: get_config() takes 0 positional arguments but 1 was given"),
])
def test_a_config_file_that_cannot_load_is_one_line_and_exit_2(flags, message):
    result = subprocess.run([sys.executable, "-m", "vit_jax.summary", *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=NO_REEXEC)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
