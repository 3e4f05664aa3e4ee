"""Dataset name -> random-access source and a small `DatasetInfo`.

Names are either one of our offline datasets (`offline_names()`: prepared
automatically into data_dir on first use) or any tfds dataset already
prepared, in ArrayRecord format, under data_dir (`cifar10`, `cifar100`,
`imagenet2012`, a custom dataset directory, ...). Nothing is ever downloaded.
Examples must have an `image` (uint8 HxWxC) and a `label` (ClassLabel).
"""

import dataclasses
import functools
import re

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from transferlab import errors
from transferlab.data import builders
from transferlab.errors import ConfigError, UserError

resolve_data_dir = builders.resolve_data_dir

# Per-channel mean/std of pixels in [0, 1], from each train set (the usual constants).
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # CRD's constants
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012_subset": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012_real": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet_v2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATS_SAMPLE = 10_000  # examples (evenly spaced over train) used for unknown datasets' stats


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a pipeline need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple  # (H, W, C); None entries for variable-size images
    split_sizes: dict  # {split: number of examples}
    mean: tuple  # per channel, pixels scaled to [0, 1]
    std: tuple


def offline_names() -> tuple:
    """Names of the datasets we can build offline (`python -m transferlab.data.prepare`)."""
    return tuple(sorted(builders.OFFLINE_BUILDERS))


def base_name(name: str) -> str:
    """'imagenet2012/subset:5.0.0' -> 'imagenet2012'."""
    return re.split(r"[/:]", name, maxsplit=1)[0]


def _standard_builder(name: str, root) -> tfds.core.DatasetBuilder:
    """A builder reading an already-prepared tfds dataset under `root` (never downloads)."""
    base = base_name(name)
    if base in registered.list_imported_builders():
        with builders.absl_errors_only():
            try:
                builder = tfds.builder(name, data_dir=str(root))
            except Exception as e:  # pylint: disable=broad-except  (a version or config tfds does not have)
                first = errors.first_line(e, typed=False)
                if (root / base).is_dir() and "JSON" in first:  # its prepared files, not the name, are bad
                    raise UserError(f"dataset {name!r}: cannot read {root / base} ({first[:200]})") from None
                raise ConfigError(f"config key 'dataset.name': {name!r}: {first[:200]}") from e
    elif (root / base).is_dir():  # a dataset prepared elsewhere with its own code
        try:
            builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=str(root))
        except Exception as e:  # pylint: disable=broad-except
            raise UserError(f"dataset {name!r}: cannot read {root / base} ({type(e).__name__})") from e
    else:
        raise ConfigError(
            f"unknown dataset {name!r}; expected one of: {', '.join(offline_names())}, "
            f"or a tfds dataset name prepared under {root}"
        )
    with builders.absl_errors_only():
        prepared = builder.is_prepared()
    if not prepared:
        raise UserError(
            f"dataset {name!r} is not prepared under {root}; prepare it with tfds on a machine "
            f"with TensorFlow and network (tfds build {base} --file_format=array_record) "
            f"and copy its {base}/ directory into {root}"
        )
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise UserError(
            f"dataset {name!r} under {root} is stored as {file_format}; random access needs "
            f"array_record (convert it with: tfds convert_format --dataset_dir="
            f"{builder.data_dir} --out_file_format=array_record)"
        )
    problem = builders.damage(builder)
    if problem is not None:
        raise UserError(f"dataset {name!r} under {root} is damaged: {problem}; prepare it again into "
                        f"{builder.data_dir}")
    return builder


@functools.lru_cache(maxsize=None)
def _builder(name: str, root) -> tfds.core.DatasetBuilder:
    """Cached builder for `name` under the resolved `root` (prepares offline datasets)."""
    if name in builders.OFFLINE_BUILDERS:
        return builders.prepare(name, root)
    return _standard_builder(name, root)


def get_builder(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
    """The prepared tfds builder for dataset `name` (see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    return _builder(name, resolve_data_dir(data_dir))


def split_names(split: str) -> list:
    """'train[:80%]+validation' -> ['train', 'validation']: the splits a tfds split expression reads from."""
    return [part.split("[", 1)[0].strip() for part in str(split).split("+")]


def check_split(name: str, split: str, builder=None, data_dir=None) -> None:
    """Raises ConfigError unless every split named in `split` ('train', 'train[:10%]+test') exists."""
    builder = builder or get_builder(name, data_dir)
    allowed = list(builder.info.splits.keys())
    for base in split_names(split):
        if base not in allowed:
            raise ConfigError(
                f"unknown split {base!r} for dataset {name!r}; expected one of: "
                f"{', '.join(sorted(allowed))}"
            )


def split_size(name: str, split: str, data_dir=None) -> int:
    """Examples in a split expression of `name`: a split ('train'), a slice of one ('train[:90%]',
    'train[45000:]', tfds' syntax) or a sum ('train+validation'). ConfigError for an unknown split, a
    slice tfds cannot parse, or one that selects no example."""
    builder = get_builder(name, data_dir)
    check_split(name, split, builder)
    try:
        size = int(builder.info.splits[split].num_examples)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        reason = errors.first_line(e, typed=False).split(". See format")[0]
        raise ConfigError(f"split {split!r} of dataset {name!r}: {reason} (slices as "
                          "'train[:90%]' or 'train[45000:]'; https://www.tensorflow.org/datasets/splits)") from None
    if size < 1:
        raise ConfigError(f"split {split!r} of dataset {name!r} selects no examples")
    return size


def split_ranges(name: str, split: str, data_dir=None) -> list:
    """[(split, start, stop)] of the examples a split expression reads ('train[80%:]+test' ->
    [('train', 1006, 1257), ('test', 0, 360)] for digits)."""
    builder = get_builder(name, data_dir)
    infos = dict(builder.info.splits.items())
    ranges = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    return [(r.splitname, r.from_ or 0, infos[r.splitname].num_examples if r.to is None else r.to) for r in ranges]


def shared_examples(name: str, split_a: str, split_b: str, data_dir=None) -> int:
    """How many examples two split expressions of `name` both read (0: disjoint)."""
    a, b = (split_ranges(name, s, data_dir) for s in (split_a, split_b))
    return sum(max(0, min(stop_a, stop_b) - max(start_a, start_b))
               for name_a, start_a, stop_a in a for name_b, start_b, stop_b in b if name_a == name_b)


def get_source(name: str, split: str, data_dir=None):
    """Random-access source (`len`, `src[i]` -> dict of numpy) over one split of `name`."""
    builder = get_builder(name, data_dir)
    check_split(name, split, builder)
    return builder.as_data_source(split=split)


def _features(name: str, builder) -> tuple:
    """(image feature, label feature), or a UserError if the dataset lacks them."""
    features = builder.info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise UserError(
            f"dataset {name!r} has no {missing[0]!r} feature; expected 'image' and 'label', "
            f"got: {', '.join(features.keys())}"
        )
    image, label = features["image"], features["label"]
    shape = tuple(getattr(image, "shape", ()) or ())
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"dataset {name!r}: 'image' has shape {shape}; transferlab needs one fixed shape "
                        "(height, width, channels) for every image (resize them when preparing the dataset)")
    if not isinstance(getattr(label, "num_classes", None), int):
        raise UserError(f"dataset {name!r}: 'label' is a {type(label).__name__} feature; transferlab needs a "
                        "ClassLabel (tfds.features.ClassLabel(num_classes=...)) to know the number of classes")
    return image, label


def _train_stats(name: str, builder, channels: int):
    """Per-channel mean/std of up to STATS_SAMPLE evenly spaced train images (of the largest split if there
    is no 'train'), in [0, 1]."""
    splits = builder.info.splits
    split = "train" if "train" in splits else max(splits.keys(), key=lambda k: splits[k].num_examples)
    source = builder.as_data_source(split=split)
    picks = np.unique(np.linspace(0, len(source) - 1, min(len(source), STATS_SAMPLE)).astype(int))
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for i in picks:
        x = np.asarray(source[int(i)]["image"], np.float64).reshape(-1, channels) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(total_sq / count - mean**2, 0)).tolist())


@functools.lru_cache(maxsize=None)
def _dataset_info(name: str, root) -> DatasetInfo:
    builder = _builder(name, root)
    image, label = _features(name, builder)
    shape = tuple(image.shape)
    metadata = builder.info.metadata or {}
    if "mean" in metadata:
        mean, std = tuple(metadata["mean"]), tuple(metadata["std"])
    elif base_name(name) in KNOWN_STATS:
        mean, std = KNOWN_STATS[base_name(name)]
    else:
        mean, std = _train_stats(name, builder, shape[-1])
    return DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        image_shape=shape,
        split_sizes={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        mean=mean,
        std=std,
    )


def dataset_info(name: str, data_dir=None) -> DatasetInfo:
    """Classes, image shape, split sizes and normalization constants of dataset `name`."""
    get_builder(name, data_dir)  # validates the name, prepares offline datasets
    return _dataset_info(name, resolve_data_dir(data_dir))
