"""More test sets scored beside the eval split at every evaluation: `config.extra_evals`.

big_vision's ImageNet configs score the validation split, ImageNet ReaL and ImageNet-v2 as they train; the
paper's tables report all three. Each entry names a prepared dataset with the model's classes and one of its
splits, e.g. `("imagenet2012_real,validation", "imagenet_v2,test")`. ReaL's labels are sets of correct classes:
top-1 is right when it is in the set, unlabelled images are left out, and the loss is the run's own (a softmax
run's cross-entropy against the set's classes, evenly weighted; a sigmoid run's per-class loss). Metrics are
logged as `eval_<dataset>/top1` (and loss, top5) and stored in `final_metrics.json`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from vit_jax.config_check import ConfigError, dataset_entries, dataset_name


@dataclasses.dataclass(frozen=True)
class ExtraEval:
    """One entry of `config.extra_evals`."""

    dataset: str
    split: str

    @property
    def name(self) -> str:
        """The metric prefix (`config_check.dataset_name`)."""
        return dataset_name(self.dataset)


def parse(entries: Sequence[Any]) -> list[ExtraEval]:
    """`config.extra_evals`: "dataset,split" strings or (dataset, split) tuples."""
    parsed = dataset_entries(entries, "extra_evals", ("dataset", "split"),
                             "'imagenet2012_real,validation' or ('imagenet_v2', 'test')")
    return [ExtraEval(*fields) for fields in parsed]


def validate(config: ml_collections.ConfigDict) -> list[ExtraEval]:
    """Parse `config.extra_evals`; only a classifier has classes to score."""
    evals = parse(config.get("extra_evals", ()))
    if evals and config.get("objective") == "masked_patch_prediction":
        raise ConfigError(f"config.extra_evals={tuple(config.extra_evals)!r} with objective="
                          "'masked_patch_prediction': extra evaluations score classes, which a masked patch "
                          "prediction model does not predict")
    return evals


def eval_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{name: `config` evaluating that entry's split}, each checked: prepared, the split there and not empty,
    the model's class count. Raises a DatasetError naming the entry.

    Copies of `config` as it is now: derive them after the model's numerics are set (`train.restore_or_init`).
    """
    from vit_jax import data
    from vit_jax.data import datasets
    from vit_jax.data.errors import for_entry

    configs = {}
    for entry in validate(config):
        where = f"config.extra_evals entry '{entry.dataset},{entry.split}'"
        try:
            manual_dir = datasets.manual_dir_for(config, entry.dataset)
            _, num_classes = datasets.label_classes(entry.dataset, config.tfds_data_dir, manual_dir)
            if num_classes != config.num_classes:
                raise data.DatasetError(f"dataset {entry.dataset!r} has {num_classes} classes and the model "
                                        f"{config.num_classes}: an extra evaluation scores the model's own classes")
            derived = copy.deepcopy(config)
            with derived.unlocked():  # the run's label kind: the loss it trains with, whatever the set's labels
                derived.dataset, derived.eval_split = entry.dataset, entry.split
                derived.tfds_manual_dir = manual_dir
            data.dataset_info(derived, train=False)  # the split is there and not empty
        except data.DatasetError as e:  # it names the run's own fields (config.eval_split, ...): say the entry's
            raise for_entry(e, where, {"dataset": "its dataset", "eval_split": "its split"}) from None
        configs[entry.name] = derived
    return configs
