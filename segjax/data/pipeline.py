"""grain input pipelines shared by every task.

A task hands over a random-access source and a per-record transform; this module shards records
over processes, shuffles per epoch, applies seeded random transforms, batches and prefetches.
Every example gets a `valid` flag: evaluation pads its last batch with invalid examples so
nothing is dropped and shapes never change (no recompiles).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np


def _parse_absl_flags() -> None:
    # grain's worker processes read absl flags; they must be parsed once in the parent.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])


class _MarkValid:
    def __call__(self, record: dict) -> dict:
        return {**record, "valid": np.bool_(True)}


def _read_options() -> grain.ReadOptions:
    # Small buffers: the default (16 threads, 500 elements per worker) is slow and memory-hungry.
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers <= 0:
        return ds
    _parse_absl_flags()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))


class _LocalRows:
    """Local record j -> this process's rows of global batch (start + j // local_batch)."""

    def __init__(self, stream: grain.MapDataset, local_batch: int, start: int):
        self.stream, self.local_batch, self.start = stream, local_batch, start
        self.global_batch = local_batch * jax.process_count()
        self.offset = jax.process_index() * local_batch

    def __call__(self, j: int) -> dict:
        batch, row = divmod(int(j), self.local_batch)
        return self.stream[(self.start + batch) * self.global_batch + self.offset + row]


def train_dataset(source, transform: Callable[[Any, np.random.Generator], dict], *, local_batch: int, seed: int,
                  num_workers: int, start_step: int = 0) -> grain.IterDataset:
    """An endless stream of local batches: reshuffled every epoch, transforms seeded per record.

    Global batch k is records [k*B, (k+1)*B) of one stream that does not depend on the number of
    processes (B = local_batch x processes); each process reads its rows of it. So the position
    is the step alone: `start_step` resumes there, exactly, on any topology.
    """
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    stream = stream.random_map(transform, seed=seed + 1).map(_MarkValid())
    ds = grain.MapDataset.range(sys.maxsize).map(_LocalRows(stream, local_batch, start_step))
    ds = ds.to_iter_dataset(_read_options()).batch(local_batch, drop_remainder=True)
    return _prefetch(ds, num_workers)


def num_eval_batches(num_records: int, global_batch: int) -> int:
    """Batches every process runs; equal on all processes, as the sharded step needs."""
    per_process = math.ceil(num_records / jax.process_count())
    return math.ceil(per_process / (global_batch // jax.process_count()))


def eval_batches(source, transform: Callable[[Any], dict], *, local_batch: int, global_batch: int,
                 num_workers: int) -> Iterator[dict]:
    """Each record once, in order; the tail is padded with zero examples whose `valid` is False."""
    count = num_eval_batches(len(source), global_batch)
    ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
    ds = ds.map(transform).map(_MarkValid()).to_iter_dataset(_read_options())
    ds = _prefetch(ds.batch(local_batch, drop_remainder=False), num_workers)
    template = None
    it = iter(ds)
    for _ in range(count):
        batch = next(it, None)
        if batch is not None:
            template = batch
        yield _pad(batch, template, local_batch)


def _pad(batch: dict | None, template: dict, size: int) -> dict:
    def pad(x, like):
        x = np.zeros((0, *like.shape[1:]), like.dtype) if x is None else x
        fill = np.zeros((size - len(x), *like.shape[1:]), like.dtype)
        return np.concatenate([x, fill]) if len(fill) else x

    return {k: pad(None if batch is None else batch[k], v) for k, v in template.items()}
