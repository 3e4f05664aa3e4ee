"""Tests for transferlab.data: offline builders, sources, grain pipelines, augmentations."""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transferlab import data
from transferlab.data import augment, builders, prepare
from transferlab.errors import ConfigError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_SIZES = {
    "digits": {"train": 1257, "validation": 180, "test": 360},
    "mnist5k": {"train": 3500, "validation": 500, "test": 1000},
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir with digits and mnist5k prepared once for the whole session."""
    root = tmp_path_factory.mktemp("tfds")
    for name in EXPECTED_SIZES:
        builders.prepare(name, root)
    return str(root)


def _read_split(name, split, root):
    """All examples of a split, in order."""
    source = data.get_source(name, split, root)
    return source.__getitems__(list(range(len(source))))


def _digest(examples):
    """sha256 over the images, labels and indices of a list of examples."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.ascontiguousarray(ex["image"]).tobytes())
        h.update(np.int64(ex["label"]).tobytes())
        h.update(np.int64(ex["index"]).tobytes())
    return h.hexdigest()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------
# Builders and sources.


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_info_and_split_sizes(name, data_dir):
    info = data.dataset_info(name, data_dir)
    assert info.split_sizes == EXPECTED_SIZES[name]
    assert info.num_classes == 10
    assert info.image_shape == ((8, 8, 1) if name == "digits" else (28, 28, 1))
    assert len(info.mean) == len(info.std) == 1
    assert 0.05 < info.mean[0] < 0.5 and 0.2 < info.std[0] < 0.5
    assert name in data.offline_names()


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_splits_disjoint_stratified_and_indexed(name, data_dir):
    hashes, sizes = {}, {}
    for split, size in EXPECTED_SIZES[name].items():
        examples = _read_split(name, split, data_dir)
        sizes[split] = len(examples)
        assert [int(ex["index"]) for ex in examples] == list(range(size))  # index == position
        labels = np.array([ex["label"] for ex in examples])
        counts = np.bincount(labels, minlength=10)
        assert (counts > 0).all()  # every class in every split
        assert counts.max() - counts.min() <= 0.1 * size  # stratified
        assert examples[0]["image"].dtype == np.uint8
        hashes[split] = {hashlib.sha256(ex["image"].tobytes()).hexdigest() for ex in examples}
        assert len(hashes[split]) == size  # these datasets have no duplicate images
    for a in hashes:
        for b in hashes:
            if a < b:
                assert not hashes[a] & hashes[b], (a, b)
    assert sum(sizes.values()) == {"digits": 1797, "mnist5k": 5000}[name]
    if name == "mnist5k":  # 500 per class -> exactly 100 / 50 per class
        test_labels = [ex["label"] for ex in _read_split(name, "test", data_dir)]
        assert np.bincount(test_labels).tolist() == [100] * 10


def test_split_expressions_slices_and_sums(data_dir):
    """tfds' split syntax: a held-out slice of train as the validation split (CIFAR-100 has none)."""
    assert data.split_size("digits", "train", data_dir) == 1257
    assert data.split_size("digits", "train[:90%]", data_dir) + data.split_size("digits", "train[90%:]",
                                                                                 data_dir) == 1257
    assert data.split_size("digits", "train[:10]+test", data_dir) == 370
    assert data.shared_examples("digits", "train[:90%]", "train[90%:]", data_dir) == 0
    assert data.shared_examples("digits", "train[:100]", "train[90:]+test", data_dir) == 10
    assert data.shared_examples("digits", "train", "validation", data_dir) == 0
    source = data.get_source("digits", "train[-5:]", data_dir)
    whole = data.get_source("digits", "train", data_dir)
    assert len(source) == 5 and np.array_equal(source[0]["image"], whole[1252]["image"])
    for split, message in (("train[:abc]", "Error parsing split 'train[:abc]'"), ("train[10:5]", "selects no examples"),
                           ("trian[:5]", "unknown split 'trian'"), ("train[:200%]", "train[:200%]")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            data.split_size("digits", split, data_dir)


def test_prepare_is_deterministic(data_dir, tmp_path):
    for name in EXPECTED_SIZES:
        builders.prepare(name, tmp_path)
        for split in EXPECTED_SIZES[name]:
            assert _digest(_read_split(name, split, tmp_path)) == \
                _digest(_read_split(name, split, data_dir)), (name, split)
        assert data.dataset_info(name, tmp_path).mean == data.dataset_info(name, data_dir).mean


def test_prepare_waits_for_the_lock(tmp_path):
    """A prepare racing another writer (holding the lock) waits, then reuses its result."""
    done = threading.Event()
    lock = tmp_path / ".locks" / "digits.lock"

    def racer():
        builders.prepare("digits", tmp_path)
        done.set()

    with builders._file_lock(lock):  # pylint: disable=protected-access
        thread = threading.Thread(target=racer)
        thread.start()
        assert not done.wait(0.5)  # blocked on the flock held above
        assert not builders.make_builder("digits", tmp_path).is_prepared()
    thread.join(60)
    assert done.is_set()
    assert data.dataset_info("digits", tmp_path).split_sizes == EXPECTED_SIZES["digits"]
    assert builders.prepare("digits", tmp_path).is_prepared()  # second call reuses


def test_a_damaged_offline_dataset_is_moved_aside_and_prepared_again(data_dir, tmp_path, capsys):
    """Offline datasets are derived from package data in seconds: a damaged copy (found before any
    training, not at the first batch or the final test evaluation) is kept aside and rebuilt."""
    builders.prepare("digits", tmp_path)
    version_dir = tmp_path / "digits" / "1.0.0"
    damages = {
        "dataset_info.json lists no splits": lambda: [p.unlink() for p in version_dir.iterdir()],
        "ParseError": lambda: (version_dir / "dataset_info.json").write_text("{garbage"),
        "at least 64KB": lambda: os.truncate(next(version_dir.glob("digits-train.array_record*")), 1000),
        "No such file": lambda: next(version_dir.glob("digits-test.array_record*")).unlink(),
        "JSONDecodeError": lambda: (version_dir / "metadata.json").write_text("{x"),
    }
    for expected, damage in damages.items():
        damage()
        builders.prepare("digits", tmp_path)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was damaged" in err and expected in err, (expected, err)
        assert builders.damage(builders.make_builder("digits", tmp_path)) is None
    assert len(list(tmp_path.glob("digits/1.0.0.damaged-*"))) == len(damages)  # nothing deleted
    for split in EXPECTED_SIZES["digits"]:
        assert _digest(_read_split("digits", split, tmp_path)) == _digest(_read_split("digits", split, data_dir))


def test_a_damaged_prepared_tfds_dataset_is_a_one_line_error(data_dir, tmp_path):
    """A dataset prepared elsewhere (here: digits copied under another name) that is damaged is refused
    when the run starts, naming the directory to prepare again."""
    target = _copy_of_digits(data_dir, tmp_path, "mydigits")
    assert data.dataset_info("mydigits", tmp_path).split_sizes == EXPECTED_SIZES["digits"]
    os.truncate(next(target.glob("mydigits-test.array_record*")), 100)
    data.sources._builder.cache_clear()  # pylint: disable=protected-access
    with pytest.raises(UserError, match=r"dataset 'mydigits' under .* is damaged: .*; prepare it again") as e:
        data.get_source("mydigits", "train", tmp_path)
    assert "\n" not in str(e.value)


def _copy_of_digits(data_dir, root, name):
    """digits' prepared files under another name: a dataset the user prepared with tfds elsewhere."""
    builders.prepare("digits", data_dir)
    target = root / name / "1.0.0"
    target.mkdir(parents=True)
    for path in (pathlib.Path(data_dir) / "digits" / "1.0.0").iterdir():
        (target / path.name.replace("digits-", f"{name}-")).write_bytes(path.read_bytes())
    info = target / "dataset_info.json"
    info.write_text(info.read_text().replace('"name": "digits"', f'"name": "{name}"'))
    return target


def test_a_users_own_prepared_dataset_is_accepted_by_the_config(data_dir, tmp_path):
    """Not a tfds-registered name: found under dataset.data_dir (was refused as an unknown dataset)."""
    from transferlab import config as config_lib
    from transferlab.train import check_config
    _copy_of_digits(data_dir, tmp_path, "mydigits")
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"),
                             ["--config.dataset.name=mydigits", f"--config.dataset.data_dir={tmp_path}"])
    check_config(config)
    with pytest.raises(ConfigError, match=f"unknown dataset 'mydigitz'; .* or a dataset prepared under {tmp_path}"):
        config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"),
                        ["--config.dataset.name=mydigitz", f"--config.dataset.data_dir={tmp_path}"])


@pytest.mark.parametrize("edit, message", [
    (('"8",\n                            "8",', '"-1",\n                            "8",'),
     r"'image' has shape \(None, 8, 1\); transferlab needs one fixed shape"),
    (('"classLabel": {\n                    "numClasses": "10"\n                },\n                '
      '"pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel"',
      '"pythonClassName": "tensorflow_datasets.core.features.scalar.Scalar", "tensor": {"dtype": "int64", '
      '"encoding": "none", "shape": {}}'),
     r"'label' is a Scalar feature; transferlab needs a ClassLabel"),
])
def test_a_users_dataset_without_fixed_images_or_class_labels_is_one_line(data_dir, tmp_path, edit, message):
    target = _copy_of_digits(data_dir, tmp_path, "mine")
    features = target / "features.json"
    text = features.read_text()
    assert edit[0] in text
    features.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(UserError, match=message) as e:
        data.dataset_info("mine", tmp_path)
    assert "\n" not in str(e.value)


def test_unknown_names_give_one_line_errors(data_dir):
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*mnist5k") as e:
        data.get_source("nope", "train", data_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown split 'valid'.*test, train, validation") as e:
        data.get_source("mnist5k", "valid", data_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown split"):
        data.train_iterator("digits", "tst", 8, seed=0, data_dir=data_dir)
    with pytest.raises(UserError, match="not prepared under .*tfds build cifar10") as e:
        data.get_source("cifar10", "train", data_dir)
    assert data_dir in str(e.value) and "\n" not in str(e.value)
    assert len(data.get_source("mnist5k", "train[:10]+test", data_dir)) == 1010


def test_prepare_cli_errors(tmp_path, capsys):
    assert prepare.main(["--datasets", "nope", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown offline dataset 'nope'" in err
    (tmp_path / "file").write_text("x")
    for data_dir, message in ((tmp_path / "file", "--data_dir '.*/file' is a file, not a directory"),
                              (tmp_path / "file" / "sub", "data dir '.*/file/sub': cannot create .*Not a directory")):
        assert prepare.main(["--datasets", "digits", "--data_dir", str(data_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err


def test_prepare_moves_a_file_in_place_of_the_dataset_aside(tmp_path, capsys):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "1.0.0").write_text("")  # a file where the prepared dataset goes
    assert prepare.main(["--datasets", "digits", "--data_dir", str(tmp_path)]) == 0
    assert "was damaged (not a directory)" in capsys.readouterr().err
    assert data.dataset_info("digits", tmp_path).split_sizes == EXPECTED_SIZES["digits"]


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv(builders.FASHION_MNIST_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        data.get_source("fashion_mnist_deb", "train", tmp_path / "tfds")


@pytest.mark.skipif(
    not all((builders.fashion_mnist_dir() / f).is_file()
            for f in builders.FASHION_MNIST_FILES.values()),
    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist(tmp_path):
    info = data.dataset_info("fashion_mnist_deb", tmp_path)
    assert info.split_sizes == {"train": 55000, "validation": 5000, "test": 10000}
    assert info.image_shape == (28, 28, 1)
    val = data.get_source("fashion_mnist_deb", "validation", tmp_path)
    assert np.bincount([val[i]["label"] for i in range(len(val))]).tolist() == [500] * 10
    test = data.get_source("fashion_mnist_deb", "test", tmp_path)
    assert [int(test[i]["index"]) for i in range(5)] == list(range(5))


# ---------------------------------------------------------------------------
# Pipelines.


def test_train_batches_shape_and_determinism(data_dir):
    a = _take(data.train_iterator("mnist5k", "train", 64, seed=1, data_dir=data_dir), 3)
    b = _take(data.train_iterator("mnist5k", "train", 64, seed=1, data_dir=data_dir), 3)
    c = _take(data.train_iterator("mnist5k", "train", 64, seed=2, data_dir=data_dir), 1)
    _assert_same_batches(a, b)
    assert not np.array_equal(a[0]["index"], c[0]["index"])
    batch = a[0]
    assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert set(batch) == {"image", "label", "index"}
    # The label and image come from the example at `index`.
    source = data.get_source("mnist5k", "train", data_dir)
    info = data.dataset_info("mnist5k", data_dir)
    ex = source[int(batch["index"][5])]
    assert ex["label"] == batch["label"][5]
    np.testing.assert_allclose(batch["image"][5],
                               (ex["image"] / 255.0 - info.mean[0]) / info.std[0], atol=1e-5)


def test_train_resume_exactly(data_dir):
    it = data.train_iterator("digits", "train", 100, seed=3, data_dir=data_dir)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip
    expected = _take(it, 5)  # crosses the epoch boundary (12 steps per epoch)
    resumed = data.train_iterator("digits", "train", 100, seed=3, data_dir=data_dir)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)


def test_epochs_are_permutations_and_reshuffled(data_dir):
    it = data.train_iterator("mnist5k", "train", 500, seed=0, data_dir=data_dir)
    assert data.steps_per_epoch("mnist5k", "train", 500, data_dir) == 7
    epoch0 = np.concatenate([b["index"] for b in _take(it, 7)])
    epoch1 = np.concatenate([b["index"] for b in _take(it, 7)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(3500))
    assert not np.array_equal(epoch0, epoch1)


def test_process_sharding_partitions_the_global_batch(data_dir):
    single = _take(data.train_iterator("digits", "train", 64, seed=5, data_dir=data_dir), 3)
    parts = [_take(data.train_iterator("digits", "train", 64, seed=5, data_dir=data_dir,
                                       process_index=p, process_count=2), 3) for p in range(2)]
    for step in range(3):
        p0, p1 = parts[0][step], parts[1][step]
        assert p0["image"].shape[0] == p1["image"].shape[0] == 32
        assert not set(p0["index"].tolist()) & set(p1["index"].tolist())
        for k in single[step]:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), single[step][k])
    with pytest.raises(ConfigError, match="not divisible by process_count 3"):
        data.train_iterator("digits", "train", 64, seed=0, data_dir=data_dir, process_count=3)


def test_train_iterator_with_workers_matches_and_resumes(data_dir):
    plain = _take(data.train_iterator("digits", "train", 50, seed=9, data_dir=data_dir), 6)
    it = data.train_iterator("digits", "train", 50, seed=9, data_dir=data_dir, worker_count=1)
    resumed = data.train_iterator("digits", "train", 50, seed=9, data_dir=data_dir,
                                  worker_count=1)
    try:
        head = _take(it, 4)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        tail = _take(resumed, 2)
    finally:
        it.close()
        resumed.close()
    _assert_same_batches(head + tail, plain)


def test_workers_of_a_killed_process_exit(data_dir):
    """SIGKILL leaves no grain worker (nor its resource tracker) behind: they used to live on as orphans."""
    import psutil
    code = ("import sys, time\nfrom transferlab import data\n"
            f"it = data.train_iterator('digits', 'train', 50, seed=0, data_dir={data_dir!r}, worker_count=1)\n"
            "next(it)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    left = [c.pid for c in alive]
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    assert not left, f"orphaned worker processes {left}"


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_once(data_dir, process_count):
    global_batch = 100  # does not divide the 360 test examples
    n = data.num_eval_batches("digits", "test", global_batch, data_dir)
    assert n == 4
    seen = []
    for p in range(process_count):
        batches = list(data.eval_batches("digits", "test", global_batch, data_dir,
                                         process_index=p, process_count=process_count))
        assert len(batches) == n
        for b in batches:
            assert b["mask"].dtype == np.bool_
            assert b["image"].shape == (global_batch // process_count, 8, 8, 1)
            assert set(b) == {"image", "label", "index", "mask"}
            seen.extend(b["index"][b["mask"]].tolist())
    assert sorted(seen) == list(range(360))
    last = list(data.eval_batches("digits", "test", global_batch, data_dir))[-1]
    assert last["mask"].tolist() == [True] * 60 + [False] * 40
    # Re-iterable and in split order.
    first = next(iter(data.eval_batches("digits", "test", global_batch, data_dir)))
    assert first["index"].tolist() == list(range(100))


# ---------------------------------------------------------------------------
# Augmentations.


def _images(b=8, h=6, w=6, c=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, h, w, c))


def test_crop_and_flip():
    x = _images()
    key = jax.random.key(1)
    with jax.numpy_rank_promotion("raise"):
        np.testing.assert_array_equal(augment.random_crop(key, x, 0), x)
        cropped = np.asarray(augment.random_crop(key, x, 2))
        flipped = np.asarray(augment.random_flip(key, x))
    x = np.asarray(x)
    assert cropped.shape == x.shape and flipped.shape == x.shape
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(x.shape[0]):  # each crop is some window of the zero-padded image
        windows = [padded[i, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(cropped[i], w) for w in windows)
        assert (np.array_equal(flipped[i], x[i]) or np.array_equal(flipped[i], x[i, :, ::-1]))


@pytest.mark.parametrize("op", [augment.mixup, augment.cutmix])
def test_mixing_is_consistent(op):
    b = 16
    # Example i is the constant image i; its one-hot label is class i.
    x = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 8, 8, 3))
    y = jax.nn.one_hot(jnp.arange(b), b)
    with jax.numpy_rank_promotion("raise"):
        xm, ym = map(np.asarray, op(jax.random.key(4), x, y, 1.0))
    assert xm.shape == x.shape and ym.shape == y.shape
    np.testing.assert_allclose(ym.sum(-1), 1.0, rtol=1e-6)
    for i in range(b):
        weights = ym[i]
        assert (weights > 1e-6).sum() <= 2  # at most the example and its partner
        # The mean pixel equals the label-weighted mean of the two source images.
        np.testing.assert_allclose(float(xm[i].mean()), float((weights * np.arange(b)).sum()),
                                   rtol=1e-5, atol=1e-5)


def test_apply_with_configdict():
    batch = {"image": _images(b=8, h=8, w=8, c=3), "label": jnp.arange(8) % 5,
             "index": jnp.arange(8)}
    config = ml_collections.ConfigDict(
        {"crop_padding": 2, "flip": True, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
         "num_classes": 5})
    with jax.numpy_rank_promotion("raise"):
        out = jax.jit(lambda k, b: augment.apply(k, b, config))(jax.random.key(0), batch)
    assert out["image"].shape == batch["image"].shape
    assert out["label_soft"].shape == (8, 5) and out["label_soft"].dtype == jnp.float32
    np.testing.assert_allclose(out["label_soft"].sum(-1), 1.0, rtol=1e-6)
    plain = augment.apply(jax.random.key(0), batch, {"crop_padding": 0, "flip": False})
    np.testing.assert_array_equal(plain["image"], batch["image"])
    assert "label_soft" not in plain
    with pytest.raises(ConfigError, match="unknown augmentation key 'mixup'"):
        augment.apply(jax.random.key(0), batch, {"mixup": 0.2})
    with pytest.raises(ConfigError, match="num_classes"):
        augment.apply(jax.random.key(0), batch, {"mixup_alpha": 0.2})


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from transferlab.data import augment
config = {"crop_padding": 2, "flip": True, "mixup_alpha": 0.3, "cutmix_alpha": 1.0,
          "num_classes": 10}
fn = jax.jit(lambda k, b: augment.apply(k, b, config))
batch = {"image": np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32),
         "label": np.arange(8) % 10}
ref = fn(jax.random.key(0), batch)
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
out = fn(jax.random.key(0), jax.device_put(batch, NamedSharding(mesh, P("data"))))
for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-6)
assert out["image"].sharding.spec[0] == "data", out["image"].sharding
print("ok")
"""


def test_augment_on_sharded_batch_matches_unsharded():
    """A batch sharded over Explicit mesh axes (4 forced CPU devices) gives the unsharded result.

    (Auto-sharded batches need nothing special: the ops are plain jnp.)"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_storage_urls_are_refused_in_one_line(tmp_path):
    """gs://... would become a local 'gs:/...' directory through os/pathlib: refused, naming the setting."""
    from transferlab import main
    with pytest.raises(ConfigError, match=r"dataset.data_dir 'gs://bucket/tfds': storage URLs are not supported"):
        builders.resolve_data_dir("gs://bucket/tfds")
    with pytest.raises(UserError, match=r"--workdir 's3://b/run': storage URLs are not supported"):
        main.check_workdir("s3://b/run")
    main.check_workdir(str(tmp_path / "gs:" / "not-a-url"))  # a colon in a local path is fine
