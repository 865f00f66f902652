"""Fine-tuning through the real path: a digits checkpoint trained by `train_and_evaluate` at 16px, then
`config.pretrained` at 32px on another task (digit parity, 2 classes, an image folder): the run starts from a
zero head (exactly the majority-of-class-0 accuracy), learns, and its step-0 position embeddings are the
checkpoint's resized by `vit_jax.interop.surgery.resize_posemb` (checked against scipy's zoom as well).
Also the presets of configs/finetune.py against the paper's fine-tuning table.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.ndimage
from flax import traverse_util
from PIL import Image

from configs import demo_finetune, finetune
from tests.train_helpers import real_like_folder, tiny_config
from vit_jax import checkpoints, config_check, data, sharding, train
from vit_jax.data.builders.digits import NUM_TRAIN, load_digits_uint8
from vit_jax.errors import UserError
from vit_jax.interop.surgery import resize_posemb

PRETRAIN_STEPS = 300  # 150 reached 0.30-0.50 by shuffle seed, 300 0.54-0.79 (seeds 0-4)
FINETUNE_STEPS = 160


def _digits_config(**overrides):
    """tiny_config on digits: no crop or flip (a flipped digit is another digit), 1px translation."""
    base = {"dataset": "digits", "train_split": "train", "eval_split": "test", "pp.inception_crop": False,
            "pp.flip": False, "pp.random_translate": 1, "batch_size": 32, "eval_batch_size": 64,
            "log_every": 50, "keep_checkpoints": 1}
    config = tiny_config(**{**base, **overrides})
    config_check.validate(config, jax.device_count())
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-class digits classifier trained at 16px (a 4x4 patch grid): (workdir, its config, final metrics)."""
    root = tmp_path_factory.mktemp("pretrain")
    config = _digits_config(**{"tfds_data_dir": str(root / "tfds"), "total_steps": PRETRAIN_STEPS,
                               "eval_every": PRETRAIN_STEPS, "checkpoint_every": PRETRAIN_STEPS,
                               "optimizer.lr": 1e-2, "optimizer.warmup_steps": 10,
                               "optimizer.schedule": "cosine", "optimizer.weight_decay": 1e-4})
    workdir = str(root / "run")
    result = train.train_and_evaluate(config, workdir)
    return workdir, config, result


@pytest.fixture(scope="module")
def parity_folder(tmp_path_factory):
    """Digits relabelled even/odd as an image folder (SOURCE/{train,test}/{even,odd}/N.png), the digits splits."""
    source = tmp_path_factory.mktemp("parity_images")
    images, labels = load_digits_uint8()
    for i, (image, label) in enumerate(zip(images, labels)):
        split = "train" if i < NUM_TRAIN else "test"
        folder = source / split / ("odd" if label % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    test_even = float(np.mean(labels[NUM_TRAIN:] % 2 == 0))
    return str(source), test_even


def _finetune_config(pretrained_dir: str, parity_dir: str, tfds_dir: str):
    """32px (an 8x8 grid), 2 classes, the fine-tuning recipe: SGD momentum 0.9, clip 1, cosine, warmup."""
    return _digits_config(**{
        "dataset": "image_folder", "tfds_data_dir": tfds_dir, "tfds_manual_dir": parity_dir, "num_classes": 2,
        "image_size": 32, "pp.random_translate": 2, "pretrained": pretrained_dir, "total_steps": FINETUNE_STEPS,
        "eval_every": FINETUNE_STEPS, "checkpoint_every": FINETUNE_STEPS, "optimizer.name": "sgd",
        "optimizer.momentum": 0.9, "optimizer.lr": 0.03, "optimizer.weight_decay": 0.0,
        "optimizer.grad_clip_norm": 1.0, "optimizer.schedule": "cosine", "optimizer.warmup_steps": 8})


@pytest.fixture(scope="module")
def finetune_setup(pretrained, parity_folder, tmp_path_factory):
    pretrained_dir, _, _ = pretrained
    parity_dir, test_even = parity_folder
    tfds_dir = str(tmp_path_factory.mktemp("parity_tfds"))
    data.prepare("image_folder", tfds_dir, parity_dir)
    return _finetune_config(pretrained_dir, parity_dir, tfds_dir), test_even


def _step0_state(config, workdir: str):
    """The state `train_and_evaluate` starts from in an empty workdir (what `--config.pretrained` gives)."""
    mesh = sharding.make_mesh(config)
    ckpt = checkpoints.Checkpoints(workdir, keep=1)
    try:
        state, data_state, meta = train.restore_or_init(config, mesh, config.total_steps, ckpt)
    finally:
        ckpt.close()
    assert data_state is None and meta == {}  # nothing resumed: this is step 0 of the fine-tuning run
    return state, mesh


def _checkpoint_params(workdir: str) -> dict:
    """The pre-training run's last saved params, read with orbax directly (not through vit_jax.interop)."""
    directory = checkpoints.checkpoint_dir(workdir)
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    return ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "params"))


def test_pretraining_learned_digits(pretrained):
    _, _, result = pretrained
    assert result["step"] == PRETRAIN_STEPS and result["test_accuracy"] > 0.3  # chance: 0.1


def test_step0_of_finetuning_is_the_checkpoint_with_resized_posemb_and_a_zero_head(pretrained, finetune_setup,
                                                                                   tmp_path):
    pretrained_dir, _, _ = pretrained
    config, _ = finetune_setup
    state, _ = _step0_state(config, str(tmp_path / "probe"))
    params = jax.device_get(state["params"])
    old = _checkpoint_params(pretrained_dir)

    old_posemb = np.asarray(old["Transformer"]["posembed_input"]["pos_embedding"])
    new_posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert old_posemb.shape == (1, 1 + 4 * 4, 32) and new_posemb.shape == (1, 1 + 8 * 8, 32)
    np.testing.assert_array_equal(new_posemb, resize_posemb(old_posemb, 8))
    # Independently: the class token's entry kept, the grid zoomed linearly as the original code does.
    np.testing.assert_array_equal(new_posemb[0, 0], old_posemb[0, 0])
    zoomed = scipy.ndimage.zoom(old_posemb[0, 1:].reshape(4, 4, 32).astype(np.float64), (2, 2, 1), order=1)
    np.testing.assert_allclose(new_posemb[0, 1:].reshape(8, 8, 32), zoomed, rtol=1e-5, atol=1e-6)

    assert params["head"]["kernel"].shape == (32, 2) and not np.any(params["head"]["kernel"])
    assert not np.any(params["head"]["bias"])
    new_flat, old_flat = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(old, sep="/")
    encoder = sorted(set(new_flat) - {"head/kernel", "head/bias", "Transformer/posembed_input/pos_embedding"})
    assert set(old_flat) == set(encoder) | {"head/kernel", "head/bias", "Transformer/posembed_input/pos_embedding"}
    for name in encoder:  # everything else is the checkpoint's, bit for bit
        np.testing.assert_array_equal(new_flat[name], old_flat[name], err_msg=name)


def test_finetuning_at_new_resolution_and_class_count_beats_the_zero_head(finetune_setup, tmp_path):
    config, test_even = finetune_setup
    workdir = str(tmp_path / "finetune")
    state, mesh = _step0_state(config, str(tmp_path / "probe"))
    before = train.evaluate(config, train.make_eval_step(config, mesh), state["params"], mesh)
    # All logits 0: every image is called class 0 ("even"), at a loss of ln 2.
    assert before["top1"] == pytest.approx(test_even, abs=1e-6)
    assert before["loss"] == pytest.approx(math.log(2), rel=1e-5)

    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == FINETUNE_STEPS
    assert result["test_accuracy"] >= max(0.7, before["top1"] + 0.2), (before, result)
    assert result["test_loss"] < 0.7 * before["loss"]


def test_demo_finetune_config_resizes_and_replaces_the_head():
    pre, ft = demo_finetune.get_config("pretrain"), demo_finetune.get_config()
    assert ft.image_size == 2 * pre.image_size and ft.model.patch_size == pre.model.patch_size
    assert pre.model.representation_size > 0 and ft.model.representation_size == 0  # -> a new zero head
    assert (ft.optimizer.name, ft.optimizer.momentum, ft.optimizer.weight_decay, ft.optimizer.grad_clip_norm,
            ft.optimizer.schedule) == ("sgd", 0.9, 0.0, 1.0, "cosine")
    with pytest.raises(ValueError, match="valid: 'pretrain', 'finetune'"):
        demo_finetune.get_config("pre-train")


# The paper's fine-tuning table (Appendix B.1.1, Table 4): steps and the learning-rate grid, and the share of the
# training split held out to pick the learning rate (1% ImageNet, 2% CIFAR, 10% Pets and Flowers).
PAPER_TABLE = {
    "imagenet2012": (20_000, (0.003, 0.01, 0.03, 0.06), "train[:99%]"),
    "cifar10": (10_000, (0.001, 0.003, 0.01, 0.03), "train[:98%]"),
    "cifar100": (10_000, (0.001, 0.003, 0.01, 0.03), "train[:98%]"),
    "oxford_iiit_pet": (500, (0.001, 0.003, 0.01, 0.03), "train[:90%]"),
    "oxford_flowers102": (500, (0.001, 0.003, 0.01, 0.03), "train[:90%]"),
}
NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10, "cifar100": 100, "oxford_iiit_pet": 37, "oxford_flowers102": 102}


@pytest.mark.parametrize("dataset", sorted(PAPER_TABLE))
def test_finetune_presets_follow_the_paper(dataset):
    steps, lr_grid, train_split = PAPER_TABLE[dataset]
    config = finetune.get_config(f"{dataset},B/32")
    assert config.model.variant == "B/32" and config.model.patch_size == 32
    assert (config.total_steps, config.train_split, config.num_classes) == (steps, train_split,
                                                                            NUM_CLASSES[dataset])
    assert config.optimizer.lr in lr_grid
    assert (config.image_size, config.batch_size, config.model.representation_size) == (384, 512, 0)
    opt = config.optimizer
    assert (opt.name, opt.momentum, opt.weight_decay, opt.grad_clip_norm, opt.schedule) == (
        "sgd", 0.9, 0.0, 1.0, "cosine")
    assert 0 < opt.warmup_steps < steps // 4
    config_check.validate(config, 8)


@pytest.mark.parametrize("arg, lr, dropout", [
    # google-research/vision_transformer: configs/vit.py (lr) and configs/models.py (dropout_rate).
    ("cifar10,B/16", 0.01, 0.0), ("cifar10", 0.01, 0.0), ("cifar100,B/16", 0.03, 0.0), ("cifar10,B/32", 0.03, 0.0),
    ("imagenet2012,L/16", 0.03, 0.1), ("imagenet2012,L/32", 0.03, 0.0), ("imagenet2012,H/14", 0.03, 0.1),
    ("cifar10,R50+B/16", 0.03, 0.1), ("oxford_iiit_pet,S/16", 0.003, 0.0),
])
def test_finetune_keeps_the_original_codes_learning_rate_and_dropout_exceptions(arg, lr, dropout):
    config = finetune.get_config(arg)
    assert (config.optimizer.lr, config.model.dropout_rate) == (lr, dropout)
    assert config.image_size == (378 if config.model.patch_size == 14 else 384)
    config_check.validate(config, 8)  # every variant's preset can run (384 is no multiple of 14)


def test_finetune_rejects_an_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*valid:"):
        finetune.get_config("cifar11")


def _head(params) -> np.ndarray:
    return np.asarray(jax.device_get(params["head"]["kernel"]))


@pytest.mark.parametrize("pretrained_head", ["reset", "keep"])
def test_a_checkpoint_with_this_runs_class_count_gets_a_zero_head_unless_kept(pretrained, tmp_path,
                                                                              pretrained_head):
    """Fine-tuning the 10-class digits checkpoint on 10 classes: a new zero head, as the paper (its head only with
    pretrained_head='keep'); evaluating the checkpoint keeps its head either way."""
    pretrained_dir, _, _ = pretrained
    config = _digits_config(**{"pretrained": pretrained_dir, "pretrained_head": pretrained_head,
                               "tfds_data_dir": str(tmp_path / "unused")})
    old = np.asarray(_checkpoint_params(pretrained_dir)["head"]["kernel"])
    assert old.shape == (32, 10) and np.any(old)
    state, _ = _step0_state(config, str(tmp_path / "train"))
    if pretrained_head == "reset":
        assert not np.any(_head(state["params"]))
    else:
        np.testing.assert_array_equal(_head(state["params"]), old)
    ckpt = checkpoints.Checkpoints(str(tmp_path / "eval"), keep=1)
    try:
        evaluated, _, _ = train.restore_or_init(config, sharding.make_mesh(config), config.total_steps, ckpt,
                                                params_only=True)
    finally:
        ckpt.close()
    np.testing.assert_array_equal(_head(evaluated["params"]), old)


def test_a_pretrained_start_is_a_fresh_runs_state_around_the_loaded_params_without_initialising_the_model(
        pretrained, tmp_path, monkeypatch):
    """Step 0, the seed's train rng, the optimizer's init of the loaded params and an average equal to them (its own
    buffers); nothing for evaluation but the params. The model's random initialisation (init_state) never runs."""
    from vit_jax import optim

    pretrained_dir, _, _ = pretrained
    config = _digits_config(**{"pretrained": pretrained_dir, "optimizer.ema_decay": 0.9,
                               "tfds_data_dir": str(tmp_path / "unused")})
    mesh = sharding.make_mesh(config)
    fresh = train.init_state(config, mesh, config.total_steps)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was initialised only to be replaced by the pre-trained weights")

    monkeypatch.setattr(train, "init_state", refuse)
    for params_only in (False, True):
        ckpt = checkpoints.Checkpoints(str(tmp_path / f"run{params_only}"), keep=1)
        try:
            state, _, _ = train.restore_or_init(config, mesh, config.total_steps, ckpt, params_only=params_only)
        finally:
            ckpt.close()
        assert int(state["step"]) == 0
        np.testing.assert_array_equal(jax.device_get(state["rng"]), jax.device_get(fresh["rng"]))
        params = jax.device_get(state["params"])
        assert np.any(params["Transformer"]["encoder_norm"]["scale"] != 1)  # trained, not a fresh LayerNorm
        assert np.any(params["head"]["kernel"]) == params_only  # training: a new zero head; evaluating: its own
        if params_only:
            assert state["opt_state"] is None and "ema" not in state
            continue
        expected = optim.make_optimizer(config, config.total_steps).init(state["params"])
        assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(expected)
        for got, want in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))
        for got, want in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])):
            np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))
            pointer = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in (got, want)]
            assert pointer[0] != pointer[1]  # each is updated in place by the donated step


def test_evaluating_a_checkpoint_for_other_classes_is_refused_not_scored_at_chance(pretrained, tmp_path):
    """--mode=eval of the 10-class checkpoint as a 7-class model: an error, where a new zero head would score
    chance accuracy without a word."""
    from vit_jax.interop import CheckpointError

    pretrained_dir, _, _ = pretrained
    config = _digits_config(pretrained=pretrained_dir, num_classes=7, tfds_data_dir=str(tmp_path / "unused"))
    ckpt = checkpoints.Checkpoints(str(tmp_path / "eval"), keep=1)
    try:
        with pytest.raises(CheckpointError, match=r"cannot be evaluated as a 7-class classifier: the checkpoint's "
                                                  r"head has 10 classes"):
            train.restore_or_init(config, sharding.make_mesh(config), config.total_steps, ckpt, params_only=True)
        # Training with pretrained_head='keep' asks for that head too: it was replaced by a new one in silence.
        config.pretrained_head = "keep"
        with pytest.raises(config_check.ConfigError, match=r"^config.pretrained_head='keep' cannot keep the head of "
                                                           r".*: the checkpoint's head has 10 classes; use "
                                                           r"pretrained_head='reset' for a new zero head"):
            train.restore_or_init(config, sharding.make_mesh(config), config.total_steps, ckpt)
    finally:
        ckpt.close()


def test_fewshot_features_are_what_the_head_sees(pretrained):
    """The features few-shot evaluation regresses on, multiplied by the checkpoint's own head, classify the test
    split exactly as the run's evaluation did."""
    from vit_jax import fewshot

    workdir, config, result = pretrained
    mesh = sharding.make_mesh(config)
    ckpt = checkpoints.Checkpoints(workdir, keep=1)
    try:
        state, _, _ = train.restore_or_init(config, mesh, config.total_steps, ckpt, params_only=True)
    finally:
        ckpt.close()
    represent = fewshot.make_representation_fn(config, mesh)
    features, labels = fewshot.split_features(config, represent, state["params"], mesh, config.eval_split)
    assert features.shape == (len(load_digits_uint8()[1]) - NUM_TRAIN, config.model.hidden_size)
    head = jax.device_get(state["params"]["head"])
    accuracy = np.mean(np.argmax(features @ head["kernel"] + head["bias"], axis=1) == labels)
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1.5 / len(labels))


def test_fewshot_mode_scores_a_checkpoint_whatever_its_head_and_writes_nothing(pretrained, tmp_path, capsys):
    """--mode=fewshot of the 10-class digits checkpoint under a 2-class config (its head is not read, where
    --mode=eval refuses it): 10 shots per class of its features recognise digits far above chance (0.1), and
    better than 1 shot (the checkpoint's own head scores 0.5-0.8 after its 300 steps)."""
    from vit_jax import fewshot

    pretrained_dir, pre_config, _ = pretrained
    config = _digits_config(pretrained=pretrained_dir, num_classes=2, tfds_data_dir=pre_config.tfds_data_dir,
                            **{"fewshot.datasets": ("digits,train,test",), "fewshot.shots": (1, 10),
                               "fewshot.seeds": 2})
    workdir = tmp_path / "fewshot"
    scores = train.evaluate_checkpoint(config, str(workdir), mode="fewshot")
    assert set(scores) == {"digits_1shot", "digits_10shot"}
    assert scores["digits_10shot"] > max(0.4, scores["digits_1shot"] + 0.05)
    assert not workdir.exists()
    assert f"few-shot of {pretrained_dir}: digits_1shot" in capsys.readouterr().out
    with pytest.raises(fewshot.FewshotError, match=r"200 shot\(s\) need 200 training image\(s\) of every class"):
        with config.unlocked():
            config.fewshot.shots = (200,)
        train.evaluate_checkpoint(config, str(workdir), mode="fewshot")
    with config.unlocked():
        config.fewshot.datasets = ()
    with pytest.raises(UserError, match=r"--mode=fewshot needs datasets to evaluate on"):
        train.evaluate_checkpoint(config, str(workdir), mode="fewshot")


def test_eval_of_a_real_like_split_scores_labelled_images_only_and_needs_no_train_split(pretrained, tmp_path):
    """ImageNet ReaL's form: one 'validation' split, a set of correct classes per image, some images with none.
    --mode=eval scores the top-1 class against the set and leaves the unlabelled images out of every metric
    (big_vision's classification evaluator): the same as a folder holding only the labelled images."""
    pretrained_dir, _, _ = pretrained
    _, digit = load_digits_uint8()
    # Labelled test images get their digit and sometimes the next one too; every third image gets no label.
    rows = [(i, () if i % 3 == 0 else (int(digit[i]),) + ((int(digit[i] + 1) % 10,) if i % 2 else ()))
            for i in range(NUM_TRAIN, NUM_TRAIN + 90)]
    scores = {}
    for name, chosen in (("with_unlabelled", rows), ("labelled_only", [r for r in rows if r[1]])):
        source = real_like_folder(tmp_path / name, chosen)
        tfds_dir = str(tmp_path / f"tfds_{name}")
        data.prepare("image_folder", tfds_dir, source)
        # The softmax model as it was trained ("single", ReaL's case), and read as a sigmoid one ("multi").
        for kind in ("single", "multi"):
            config = _digits_config(dataset="image_folder", tfds_data_dir=tfds_dir, tfds_manual_dir=source,
                                    label_kind=kind, train_split="train", eval_split="validation",
                                    pretrained=pretrained_dir)
            scores[name, kind] = train.evaluate_checkpoint(config, str(tmp_path / f"eval_{name}_{kind}"))
    for kind in ("single", "multi"):
        assert set(scores["with_unlabelled", kind]) == {"loss", "top1", "top5"}
        for key in ("loss", "top1", "top5"):
            assert scores["with_unlabelled", kind][key] == pytest.approx(scores["labelled_only", kind][key],
                                                                         rel=1e-6), (kind, key)
    assert 0.2 < scores["labelled_only", "single"]["top1"] < scores["labelled_only", "single"]["top5"]
    for key in ("top1", "top5"):  # the same guesses against the same sets; only the loss is the run's own
        assert scores["labelled_only", "single"][key] == scores["labelled_only", "multi"][key]
    assert np.isfinite(scores["labelled_only", "single"]["loss"])
    assert scores["labelled_only", "single"]["loss"] != pytest.approx(scores["labelled_only", "multi"]["loss"])

    # An independent reference of the softmax scores (big_vision's ReaL evaluation): the checkpoint's logits on
    # the decoded eval images, and over the labelled images only: top-1 / top-5 right when they hold a class of
    # the set, loss the cross-entropy of the softmax against the set as a uniform distribution (float64).
    from vit_jax import predict
    from vit_jax.data import preprocess
    from vit_jax.models.vit import build_model

    config = _digits_config(label_kind="single", pretrained=pretrained_dir)
    params, num_classes = predict.load_params(pretrained_dir, config)  # the head as trained; the run's numerics
    model = build_model(config.model, num_classes)
    evaluate = preprocess.EvalPreprocess(config.image_size, num_classes, config.pp.eval_crop_fraction,
                                         config.pp.antialias)
    source = tmp_path / "with_unlabelled"
    pixels = np.stack([preprocess.to_unit_range(evaluate({"image": (source / f"{i}.png").read_bytes(), "label": 0,
                                                          "index": 0})["image"]) for i, _ in rows])
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, pixels), np.float64)
    labelled = [k for k, (_, labels) in enumerate(rows) if labels]
    sets = np.zeros((len(rows), num_classes))
    for k, (_, labels) in enumerate(rows):
        sets[k, list(labels)] = 1.0
    logits, sets = logits[labelled], sets[labelled]
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    expected = {"top1": np.mean(sets[np.arange(len(sets)), logits.argmax(1)] > 0),
                "top5": np.mean([sets[k, np.argsort(-row)[:5]].any() for k, row in enumerate(logits)]),
                "loss": np.mean(-np.sum(sets / sets.sum(1, keepdims=True) * log_probs, axis=1))}
    got = scores["with_unlabelled", "single"]
    assert len(labelled) == 60 and 0.2 < expected["top1"] < expected["top5"] < 1.0
    for key in ("top1", "top5"):  # a float32 near-tie may flip one image's guess
        assert got[key] == pytest.approx(expected[key], abs=1.01 / len(labelled)), (key, got, expected)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4), (got, expected)
