"""grain pipelines: an infinite, checkpointable train iterator and finite padded eval batches.

Batches are dicts of numpy arrays for ONE process (local batch = global batch
// process_count):

    image  float32 [b, H, W, C]  (pixels / 255 - mean) / std, per channel
    label  int32 [b]
    index  int32 [b]             the example's position in its split
    mask   bool [b]              eval only: False on padding rows

Order. Epoch e of a split of N examples is a permutation of [0, N) drawn
with seed SeedSequence([seed, e]) (grain's `index_shuffle`), so every epoch
is reshuffled. Global step t of the epoch takes permutation entries
[t*G, (t+1)*G) (G = global batch size; the N % G leftovers of each epoch are
dropped) and process p takes the contiguous part [p*G/P, (p+1)*G/P) of it.
Concatenating the local batches of all processes in process order therefore
gives exactly the batch a single process would see, whatever the process or
worker count.

Checkpointing. `it.get_state()` is a JSON-serializable dict (grain's own
state: `{"next_index": ...}` for worker_count=0); `it.set_state(state)` on a
fresh iterator built with the same arguments resumes exactly. grain's Orbax
handler (`grain.checkpoint.CheckpointSave(it)`) works on it as well.
"""

import math
import os
import sys
import threading
import time

import grain
from grain.experimental import index_shuffle
import numpy as np

from transferlab.data import sources
from transferlab.errors import ConfigError

DEFAULT_READ_THREADS = 4  # threads reading records (per process / worker)
DEFAULT_PREFETCH_BATCHES = 8  # batches read ahead (per process / worker)


def _local_batch_size(global_batch_size, process_index, process_count) -> int:
    """global_batch_size // process_count, after checking the arguments."""
    for key, value, low in (("global_batch_size", global_batch_size, 1),
                            ("process_count", process_count, 1),
                            ("process_index", process_index, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    if process_index >= process_count:
        raise ConfigError(f"process_index {process_index} must be < process_count {process_count}")
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}; expected a multiple of {process_count}"
        )
    return int(global_batch_size // process_count)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit shuffle seed for one epoch, decorrelated across (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


class _TrainRecord:
    """Local stream position -> example (picklable, for grain worker processes)."""

    def __init__(self, source, global_batch_size, local_batch_size, process_index, seed):
        self.source = source
        self.num_records = len(source)
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.seed = seed
        self.steps_per_epoch = self.num_records // global_batch_size

    def position(self, i: int) -> int:
        """The split position read at local stream position `i`."""
        step, j = divmod(i, self.local_batch_size)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        k = step_in_epoch * self.global_batch_size + self.process_index * self.local_batch_size + j
        return index_shuffle(
            k, max_index=self.num_records - 1, seed=_epoch_seed(self.seed, epoch), rounds=4
        )

    def __call__(self, i):
        pos = self.position(int(i))
        example = self.source[pos]
        return {
            "image": np.asarray(example["image"]),
            "label": np.int32(example["label"]),
            "index": np.int32(pos),
        }


class _EvalRecord:
    """Local position -> example, or a zero padding row (mask False) past the split's end."""

    def __init__(self, source, global_batch_size, local_batch_size, process_index, image_shape):
        self.source = source
        self.num_records = len(source)
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.image_shape = image_shape

    def __call__(self, i):
        step, j = divmod(int(i), self.local_batch_size)
        pos = step * self.global_batch_size + self.process_index * self.local_batch_size + j
        if pos >= self.num_records:
            return {
                "image": np.zeros(self.image_shape, np.uint8),
                "label": np.int32(0),
                "index": np.int32(0),
                "mask": np.bool_(False),
            }
        example = self.source[pos]
        return {
            "image": np.asarray(example["image"]),
            "label": np.int32(example["label"]),
            "index": np.int32(pos),
            "mask": np.bool_(True),
        }


class _Normalize:
    """uint8 image batch -> float32 (x / 255 - mean) / std."""

    def __init__(self, mean, std):
        std = np.asarray(std, np.float32)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (np.asarray(mean, np.float32) / std).astype(np.float32)

    def __call__(self, batch):
        batch = dict(batch)
        batch["image"] = batch["image"].astype(np.float32) * self.scale - self.shift
        return batch


def _allow_unparsed_flags():
    """grain 0.2.18's worker processes read an absl flag, which fails unless flags were
    parsed (google/grain#1355, fixed upstream in #1361). Outside `absl.app` (scripts,
    pytest) mark them parsed so flag defaults apply; a no-op under `absl.app`."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(read_threads, prefetch_batches):
    return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)


def _check_split_size(name, split, num_records, global_batch_size):
    if num_records < global_batch_size:
        raise ConfigError(
            f"config key 'batch_size': {global_batch_size} exceeds the {num_records} examples of "
            f"{name}:{split}; expected at most {num_records}"
        )


def steps_per_epoch(name, split, global_batch_size, data_dir=None) -> int:
    """Train steps in one epoch: split size // global batch size (remainder dropped)."""
    num_records = len(sources.get_source(name, split, data_dir))
    _check_split_size(name, split, num_records, global_batch_size)
    return num_records // global_batch_size


def train_iterator(name, split, global_batch_size, seed, data_dir=None, process_index=0,
                   process_count=1, worker_count=0, *, read_threads=DEFAULT_READ_THREADS,
                   prefetch_batches=DEFAULT_PREFETCH_BATCHES):
    """Infinite iterator of shuffled, full local train batches (see the module docstring).

    Args:
      name, split: dataset and split (`sources.get_source`).
      global_batch_size: examples per step over all processes; must divide by process_count.
      seed: shuffling seed (int >= 0); same seed -> same batches.
      data_dir: tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      process_index, process_count: this process's slice of every global batch.
      worker_count: grain worker processes (0 = read in this process's threads).
      read_threads, prefetch_batches: grain ReadOptions (per process or worker).

    Returns:
      A grain DatasetIterator with `get_state()` -> dict and `set_state(dict)`.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    info = sources.dataset_info(name, data_dir)
    source = sources.get_source(name, split, data_dir)
    _check_split_size(name, split, len(source), global_batch_size)
    record = _TrainRecord(source, global_batch_size, local_batch_size, process_index, int(seed))
    length = (sys.maxsize // local_batch_size) * local_batch_size  # "infinite"
    ds = (
        grain.MapDataset.range(length)
        .map(record)
        .batch(local_batch_size, drop_remainder=True)
        .map(_Normalize(info.mean, info.std))
        .to_iter_dataset(_read_options(read_threads, prefetch_batches))
    )
    if worker_count:
        _allow_unparsed_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                            worker_init_fn=exit_with_parent)
    return iter(ds)


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:  # noqa: ARG001 (grain's signature)
    """In a grain worker process: exit once the training process is gone. A SIGKILLed run (a preemption's
    grace period ending) cannot close its iterator, and its workers (~260 MB each) lived on as orphans."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def num_eval_batches(name, split, global_batch_size, data_dir=None) -> int:
    """Number of (padded) eval batches: ceil(split size / global batch size)."""
    _local_batch_size(global_batch_size, 0, 1)
    return math.ceil(len(sources.get_source(name, split, data_dir)) / global_batch_size)


def eval_batches(name, split, global_batch_size, data_dir=None, process_index=0,
                 process_count=1, *, read_threads=DEFAULT_READ_THREADS,
                 prefetch_batches=DEFAULT_PREFETCH_BATCHES):
    """Finite, re-iterable local batches visiting every example of `split` once, in order.

    Global batch t holds split positions [t*G, (t+1)*G); positions past the end
    are padding rows (zero image before normalization, label 0, index 0,
    mask False). Every process gets `num_eval_batches(...)` batches.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    info = sources.dataset_info(name, data_dir)
    source = sources.get_source(name, split, data_dir)
    num_batches = math.ceil(len(source) / global_batch_size)
    record = _EvalRecord(source, global_batch_size, local_batch_size, process_index,
                         info.image_shape)
    return (
        grain.MapDataset.range(num_batches * local_batch_size)
        .map(record)
        .batch(local_batch_size, drop_remainder=True)
        .map(_Normalize(info.mean, info.std))
        .to_iter_dataset(_read_options(read_threads, prefetch_batches))
    )
