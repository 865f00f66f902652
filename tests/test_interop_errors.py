"""Bad checkpoints are errors naming the file and what is wrong — never a silent partial load, never unpickled."""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import numpy as np
import pytest

from tests.test_interop_common import random_params, tiny_config
from vit_jax.interop import CheckpointError, load_pretrained, save_as
from vit_jax.interop.common import flatten, params_to_canonical

MLP_KERNEL = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
LN_SCALE = "Transformer/encoderblock_0/LayerNorm_0/scale"


@pytest.fixture(scope="module")
def flat_params():
    return params_to_canonical(random_params(tiny_config(), 4))


def _write_npz(path, flat) -> str:
    np.savez(path, **flat)
    return str(path)


def test_missing_unexpected_and_wrong_shaped_keys_are_all_listed_with_both_shapes(tmp_path, flat_params):
    flat = dict(flat_params)
    del flat[LN_SCALE]
    flat["Transformer/encoderblock_0/Extra_0/kernel"] = np.zeros((3, 5), np.float32)
    flat[MLP_KERNEL] = np.zeros((64, 100), np.float32)
    path = _write_npz(tmp_path / "bad.npz", flat)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, tiny_config())
    message = str(e.value)
    assert path in message
    assert f"missing 1 key(s): {LN_SCALE} (model (64,))" in message
    assert "unexpected 1 key(s): Transformer/encoderblock_0/Extra_0/kernel (checkpoint (3, 5))" in message
    assert f"{MLP_KERNEL} (checkpoint (64, 100), model (64, 128))" in message


def test_a_checkpoint_of_another_architecture_lists_every_misfit(tmp_path, flat_params):
    path = _write_npz(tmp_path / "vit.npz", flat_params)
    config = tiny_config()
    config.num_layers = 3  # the file has 2 blocks
    with pytest.raises(CheckpointError, match=r"missing \d+ key\(s\): Transformer/encoderblock_2/") as e:
        load_pretrained(path, config)
    assert "Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias (model (64,))" in str(e.value)


def test_torch_checkpoint_misfit_lists_unconsumed_torch_keys(tmp_path, flat_params):
    from vit_jax.interop import torch_hub

    state = torch_hub.canonical_to_timm(flat_params)
    state["blocks.0.ls1.gamma"] = np.ones(64, np.float32)  # LayerScale: no place in this model
    path = str(tmp_path / "timm.safetensors")
    torch_hub.write_safetensors(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): blocks\.0\.ls1\.gamma \(checkpoint \(64,\)\)"):
        load_pretrained(path, tiny_config())


@pytest.mark.parametrize("name, what", [
    ("vit.npz", ".npz archive (BadZipFile: "), ("vit.safetensors", "safetensors file ("),
    ("pytorch_model.bin", "zip archive ("),  # torch.save's format is a zip
])
def test_truncated_files_are_errors_naming_the_file(tmp_path, flat_params, name, what):
    path = str(tmp_path / name)
    if name.endswith(".npz"):
        _write_npz(path, flat_params)
    elif name.endswith(".safetensors"):
        save_as(random_params(tiny_config(), 4), tiny_config(), path, "timm")
    else:
        torch = pytest.importorskip("torch")
        from vit_jax.interop import torch_hub

        torch.save({k: torch.from_numpy(v) for k, v in torch_hub.canonical_to_timm(flat_params).items()}, path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, tiny_config())
    assert f"{path}: truncated or corrupt {what}" in str(e.value)


def test_a_safetensors_file_cut_inside_its_header_says_so(tmp_path):
    """Cut before the end of its JSON header, a .safetensors was "unrecognised checkpoint file"."""
    path = str(tmp_path / "vit.safetensors")
    save_as(random_params(tiny_config(), 4), tiny_config(), path, "timm")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:100])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: truncated safetensors file: its header alone is "
                                              r"\d+ bytes, the whole file 100; download or copy it again$"):
        load_pretrained(path, tiny_config())


UNRECOGNISED = ("unrecognised checkpoint file (not .npz, safetensors or torch; starts with b'thes'); valid: official "
                ".npz, timm/HF .safetensors/.bin/.pth, an orbax directory")


@pytest.mark.parametrize("name, message", [
    ("vit.npz", "not an .npz archive (no zip header; starts with b'thes')"),  # the name says .npz: told what it lacks
    ("vit.safetensors", UNRECOGNISED), ("vit.pth", UNRECOGNISED), ("model", UNRECOGNISED),
])
def test_a_text_file_is_a_foreign_file_named_in_the_error(tmp_path, name, message):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write("these are not weights\n" * 10)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, tiny_config())
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("name", ["empty.npz", "empty.bin"])
def test_an_npz_of_no_arrays_says_so(tmp_path, name):
    np.savez(tmp_path / "empty.npz")  # a zip with no member starts with its end record, not a member's header
    path = tmp_path / name
    if name != "empty.npz":
        path.write_bytes((tmp_path / "empty.npz").read_bytes())
    with pytest.raises(CheckpointError, match=f"{path}: .npz archive holds no arrays"):
        load_pretrained(str(path), tiny_config())


def test_a_pickle_disguised_as_npz_is_refused_unread(tmp_path, flat_params):
    path = str(tmp_path / "vit.npz")
    with open(path, "wb") as f:
        pickle.dump(dict(flat_params), f)
    with pytest.raises(CheckpointError, match="is a Python pickle, not an .npz archive; refusing to unpickle") as e:
        load_pretrained(path, tiny_config())
    assert path in str(e.value)


def test_an_npz_holding_a_pickled_object_array_is_refused(tmp_path, flat_params):
    path = str(tmp_path / "vit.npz")
    np.savez(path, **flat_params, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="unreadable array in .npz archive: 'extra'") as e:
        load_pretrained(path, tiny_config())
    assert path in str(e.value)


def test_an_npz_member_that_is_not_npy_is_named(tmp_path, flat_params):
    path = _write_npz(tmp_path / "vit.npz", flat_params)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "weights of a tiny ViT\n")
    with pytest.raises(CheckpointError, match=f"^{path}: member 'README.txt' is not a .npy array"):
        load_pretrained(path, tiny_config())


def test_an_npz_array_of_text_is_refused_naming_the_array(tmp_path, flat_params):
    path = _write_npz(tmp_path / "vit.npz", {**flat_params, "notes": np.array(["lr=0.03"])})
    with pytest.raises(CheckpointError, match=f"^{path}: array 'notes' has dtype <U7, not a weight's"):
        load_pretrained(path, tiny_config())


def test_arrays_outside_the_params_prefix_are_not_read(tmp_path, flat_params):
    """Optimizer state beside `params/` (here a pickled object array and a README) cannot abort the load."""
    path = _write_npz(tmp_path / "train_state.npz", {**{f"params/{k}": v for k, v in flat_params.items()},
                                                      "opt/notes": np.array([{"lr": 0.03}], dtype=object)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "a training state\n")
    loaded = flatten(load_pretrained(path, tiny_config()))
    np.testing.assert_array_equal(loaded[MLP_KERNEL], flat_params[MLP_KERNEL])


def _fail_after_writing(file, exception: BaseException):
    """What a serializer failing midway leaves: some bytes in its destination (a path or an open file)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "wb") as f:
            f.write(b"partial")
    else:
        file.write(b"partial")
    raise exception


@pytest.mark.parametrize("writer", ["npz", "safetensors"])
def test_a_failed_write_leaves_no_temp_file_and_the_destination_unchanged(tmp_path, monkeypatch, flat_params,
                                                                          writer):
    from vit_jax.interop import npz, torch_hub

    path = tmp_path / f"vit.{writer}"
    path.write_bytes(b"previous contents")
    if writer == "npz":  # interrupted (KeyboardInterrupt is a BaseException, not an Exception)
        monkeypatch.setattr(np, "savez", lambda file, **arrays: _fail_after_writing(file, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            npz.write_npz(flat_params, str(path))
    else:
        import safetensors.numpy

        disk_full = OSError("disk full")
        monkeypatch.setattr(safetensors.numpy, "save_file",
                            lambda tensors, filename, metadata=None: _fail_after_writing(filename, disk_full))
        with pytest.raises(OSError, match="disk full"):
            torch_hub.write_safetensors(torch_hub.canonical_to_timm(flat_params), str(path))
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert path.read_bytes() == b"previous contents"


def test_save_as_into_a_place_that_takes_no_files_is_a_checkpoint_error(tmp_path, monkeypatch):
    """A read-only or full disk was a raw OSError traceback from the temporary file, after reading the source."""
    import errno

    import safetensors.numpy

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    path = tmp_path / "vit.safetensors"
    with pytest.raises(CheckpointError, match=f"{path}: cannot write there \\(No space left on device\\); the "
                                              "destination is left as it was"):
        save_as(random_params(tiny_config(), 4), tiny_config(), str(path), "timm")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("target", ["timm", "orbax"])
def test_a_full_disk_in_safetensors_or_orbax_words_is_a_checkpoint_error_that_leaves_nothing(tmp_path, monkeypatch,
                                                                                               target):
    """safetensors and orbax (TensorStore) report a full disk as their own errors, not OSError: tracebacks, and
    orbax's half-written step directory blocked the next attempt ("exists and is not empty"). Their wording is
    that of real writes onto a full tmpfs."""
    import safetensors
    import safetensors.numpy

    from vit_jax.interop import orbax_io

    def full_safetensors(tensors, filename, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_orbax(params, meta, path):
        os.makedirs(os.path.join(path, "0.orbax-checkpoint-tmp", "params.orbax-checkpoint-tmp"))
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "Transformer.encoder_norm.bias/0" in OCDBT database: '
                         "Failed to write 784275 bytes to file 6: No space left on device [os_error_code='28']")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_safetensors)
    monkeypatch.setattr(orbax_io, "write_orbax", full_orbax)
    path = tmp_path / ("vit.safetensors" if target == "timm" else "orbax")
    with pytest.raises(CheckpointError, match=f"{path}: cannot write there \\(No space left on device \\("
                                              "(Error while serializing|RESOURCE_EXHAUSTED).*\\); the destination "
                                              "is left as it was"):
        save_as(random_params(tiny_config(), 4), tiny_config(), str(path), target)
    assert os.listdir(tmp_path) == []
    empty = tmp_path / "empty"  # an empty directory given as the destination stays, empty
    empty.mkdir()
    with pytest.raises(CheckpointError, match="cannot write there"):
        save_as(random_params(tiny_config(), 4), tiny_config(), str(empty), "orbax")
    assert os.listdir(empty) == []


class _Exploit:
    """Unpickling this would create a directory (a stand-in for running arbitrary code)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "vit.pth"])
def test_torch_files_are_read_with_weights_only(tmp_path, name):
    torch = pytest.importorskip("torch")
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / name)
    torch.save({"patch_embed.proj.weight": torch.zeros(64, 3, 8, 8), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        load_pretrained(path, tiny_config())
    assert path in str(e.value)
    assert not os.path.exists(marker)


def test_a_legacy_pickle_torch_file_is_read_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    marker = str(tmp_path / "code_ran")
    path = str(tmp_path / "old.bin")
    torch.save({"payload": _Exploit(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pretrained(path, tiny_config())
    assert not os.path.exists(marker)


def test_a_state_dict_that_is_not_a_vit_is_named(tmp_path):
    from vit_jax.interop import torch_hub

    path = str(tmp_path / "resnet.safetensors")
    torch_hub.write_safetensors({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)}, path)
    with pytest.raises(CheckpointError, match="neither a timm nor a HuggingFace ViT state dict") as e:
        load_pretrained(path, tiny_config())
    assert path in str(e.value)


def test_bad_paths_and_formats(tmp_path, flat_params):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_pretrained(str(tmp_path / "absent.npz"), tiny_config())
    with pytest.raises(CheckpointError, match="neither an orbax checkpoint .* nor an HF model"):
        load_pretrained(str(tmp_path), tiny_config())
    crashed = tmp_path / "crashed_run"  # a workdir whose run stopped before its first save
    (crashed / "checkpoints" / "10.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="crashed_run: its checkpoints/ holds no finished checkpoint yet"):
        load_pretrained(str(crashed), tiny_config())
    path = _write_npz(tmp_path / "vit.npz", flat_params)
    with pytest.raises(CheckpointError, match=r"source_format must be one of \('npz', 'timm', 'hf', 'orbax'\)"):
        load_pretrained(path, tiny_config(), source_format="jax")
    with pytest.raises(CheckpointError, match=r"vit.npz: the orbax format was asked for, but this is a file; an "
                                              r"orbax checkpoint is a directory"):  # a NotADirectoryError traceback
        load_pretrained(path, tiny_config(), source_format="orbax")
    for classes in (0, -3, 5.5):  # 0 gave a (D, 0) head in silence, the others a raw TypeError
        with pytest.raises(CheckpointError, match=f"num_classes={classes!r} is invalid: expected a positive integer"):
            load_pretrained(path, tiny_config(), num_classes=classes)
    # Checked whether or not a resize is needed (it was only when one was).
    with pytest.raises(CheckpointError, match=r"resize_method='nearest' is invalid: expected one of \('bilinear', "):
        load_pretrained(path, tiny_config(), resize_method="nearest")
    with pytest.raises(CheckpointError, match="target_format must be one of"):
        save_as(random_params(tiny_config(), 4), tiny_config(), str(tmp_path / "x"), "onnx")


def _malformed(flat, name, change):
    """A timm ('blocks.'...) or HF ('vit.'...) state dict of `flat` with the tensor `name` changed by `change`."""
    from vit_jax.interop import torch_hub

    state = (torch_hub.canonical_to_hf if name.startswith("vit.") else torch_hub.canonical_to_timm)(flat)
    state[name] = change(state[name])
    return state


@pytest.mark.parametrize("name, change, message", [
    ("blocks.0.attn.qkv.weight", lambda w: w[:100],
     r"blocks\.0\.attn\.qkv\.weight has shape \(100, 64\), expected \(3\*hidden, hidden\): its 100 rows do not split"),
    ("blocks.0.attn.qkv.bias", lambda b: b[:96],
     r"blocks\.0\.attn\.qkv\.bias has shape \(96,\), expected \(192,\): one value per output feature"),
    ("patch_embed.proj.weight", lambda w: w.reshape(64, -1),
     r"patch_embed\.proj\.weight has shape \(64, 192\), expected 4-D \(hidden, channels, patch, patch\)"),
    ("blocks.0.attn.proj.weight", lambda w: w[0],
     r"blocks\.0\.attn\.proj\.weight has shape \(64,\), expected 2-D \(out_features, in_features\)"),
    ("vit.encoder.layer.1.attention.attention.key.bias", lambda b: b[:10],
     r"encoder\.layer\.1\.attention\.attention\.key\.bias has shape \(10,\), expected \(64,\)"),
    ("vit.encoder.layer.0.attention.attention.query.weight", lambda w: w[0],
     r"encoder\.layer\.0\.attention\.attention\.query\.weight has shape \(64,\), expected 2-D"),
    ("vit.embeddings.patch_embeddings.projection.weight", lambda w: w.reshape(64, -1),
     r"embeddings\.patch_embeddings\.projection\.weight has shape \(64, 192\), expected 4-D"),
    ("vit.encoder.layer.0.attention.output.dense.weight", lambda w: w[0],
     r"encoder\.layer\.0\.attention\.output\.dense\.weight has shape \(64,\), expected 2-D"),
], ids=["qkv_rows", "qkv_bias", "patch_2d", "proj_1d", "hf_key_bias", "hf_query_1d", "hf_patch_2d", "hf_out_1d"])
def test_malformed_torch_tensors_are_named_with_their_shape(tmp_path, flat_params, name, change, message):
    """Each was a raw ValueError from a split, reshape or transpose."""
    from vit_jax.interop import torch_hub

    path = str(tmp_path / "bad.safetensors")
    torch_hub.write_safetensors(_malformed(flat_params, name, change), path)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        load_pretrained(path, tiny_config())


def test_a_0d_array_among_the_scanned_blocks_of_an_npz_is_named(tmp_path, flat_params):
    """np.savez of a scalar under Transformer/encoderblock/: an IndexError from the unstacking."""
    path = _write_npz(tmp_path / "scan.npz", {"embedding/kernel": flat_params["embedding/kernel"],
                                              "Transformer/encoderblock/LayerNorm_0/scale": np.float32(1)})
    with pytest.raises(CheckpointError, match=f"^{path}: Transformer/encoderblock/LayerNorm_0/scale has shape \\(\\), "
                                              r"expected \(depth, \.\.\.\)"):
        load_pretrained(path, tiny_config())


def _with_extra_tokens(flat, name: str, count: int):
    """A timm state dict with `count` extra tokens (DeiT's dist_token, register tokens) and their pos_embed slots."""
    from vit_jax.interop import torch_hub

    state = torch_hub.canonical_to_timm(flat)
    pos = state["pos_embed"]
    state[name] = np.zeros((1, count, pos.shape[-1]), np.float32)
    state["pos_embed"] = np.concatenate([pos[:, :1], np.zeros((1, count, pos.shape[-1]), np.float32), pos[:, 1:]], 1)
    if name == "dist_token":
        state["head_dist.weight"], state["head_dist.bias"] = state["head.weight"], state["head.bias"]
    return state


@pytest.mark.parametrize("name, count, message", [
    ("dist_token", 1, r"a distilled DeiT \(dist_token, head_dist\): this model has one class token"),
    ("reg_token", 4, r"a timm model with 4 register tokens \(reg_token \(1, 4, 64\)\): this model has no register"),
])
@pytest.mark.parametrize("image_size", [None, 32])
def test_timm_models_with_extra_tokens_are_refused_by_name(tmp_path, flat_params, name, count, message,
                                                           image_size):
    """They were refused as '17 position embeddings are not a square patch grid'."""
    from vit_jax.interop import torch_hub

    path = str(tmp_path / f"{name}.safetensors")
    torch_hub.write_safetensors(_with_extra_tokens(flat_params, name, count), path)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        load_pretrained(path, tiny_config(), image_size=image_size)


@pytest.mark.parametrize("target", ["timm", "hf"])
def test_an_axial_model_is_not_exported_to_timm_or_hf(tmp_path, target):
    """A KeyError traceback from the conversion: neither has an axial ViT."""
    config = tiny_config(classifier="gap")
    config.axial = True
    path = str(tmp_path / ("vit.safetensors" if target == "timm" else "hf"))
    with pytest.raises(CheckpointError, match=f"^{target} has no axial ViT"):
        save_as(random_params(config, 4), config, path, target)
    assert os.listdir(tmp_path) == []
