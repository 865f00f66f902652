"""The input pipeline: TFDS ArrayRecord datasets read with grain into global, sharded `jax.Array` batches.

  make_train_iterator(config, batch_sharding)  infinite, checkpointable (get_state / set_state)
  make_eval_iterator(config, batch_sharding)   one padded, masked pass over the eval split
  dataset_info(config)                         sizes, classes and label kind, checked against the config
"""

from vit_jax.data.datasets import DatasetInfo, dataset_info, prepare, prepare_command
from vit_jax.data.errors import DatasetError
from vit_jax.data.pipeline import TrainIterator, make_eval_iterator, make_train_iterator

__all__ = ["DatasetError", "DatasetInfo", "TrainIterator", "dataset_info", "make_eval_iterator",
           "make_train_iterator", "prepare", "prepare_command"]
