"""A training run's metrics: a log line per write on every process and, on process 0, TensorBoard event files.

clu's writers import TensorFlow for its summary writer (`from clu import metric_writers` does): 3-6 s of every
training run's start on a CPU host, for a few scalars per log step. A local workdir gets its event files written
here instead, with TensorBoard's own protos and record format (what `tf.summary` writes: float32 scalars under the
scalars plugin, hyperparameters as the hparams plugin's session start); a remote one (gs://) keeps clu's writer,
whose TensorFlow file system reaches the bucket.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from absl import logging


class Writer(Protocol):
    """The part of clu's `MetricWriter` interface a run uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...
    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def create(workdir: str, *, events: bool) -> Writer:
    """The run's writer: log lines, plus TensorBoard event files in `workdir` when `events` (process 0)."""
    if events and "://" in workdir:
        from clu import metric_writers  # imports TensorFlow, whose file systems write to buckets

        return metric_writers.create_default_writer(workdir)
    return MetricWriter(workdir if events else None)


class MetricWriter:
    """Log lines in clu's `LoggingWriter` form ("[step] name=value, ..."), and an event file when `logdir` is
    given: one per writer, flushed after every write (a killed run keeps everything it logged)."""

    def __init__(self, logdir: str | None):
        self._file = None
        if logdir is not None:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            os.makedirs(logdir, exist_ok=True)
            # TensorBoard reads a directory's files in name order: the nanoseconds order two writers of one second
            now = time.time_ns()
            name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{os.getpid()}.{now}.v2"
            self.path = os.path.join(logdir, name)
            self._file = RecordWriter(open(self.path, "wb"))  # noqa: SIM115 (closed by close())
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))
        if self._file is not None:
            from tensorboard.plugins.scalar.summary_v2 import scalar_pb

            for name, value in scalars.items():
                self._write_summary(step, scalar_pb(name, value))
            self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """`hparams`: a flat dict, name -> bool, int, float or str (None is written as "", as clu does)."""
        logging.info("[Hyperparameters] %s", dict(hparams))
        if self._file is not None:
            from tensorboard.plugins.hparams.summary_v2 import hparams_pb

            self._write_summary(0, hparams_pb({k: "" if v is None else v for k, v in hparams.items()}))
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def _write_summary(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._file.write(event.SerializeToString())
