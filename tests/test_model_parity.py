"""Forward parity of our CIFAR model zoo with RepDistiller's own PyTorch models.

Goldens: tests/parity/data/models/<name>.npz, made by tests/parity/make_model_goldens.py
from RepDistiller's `models/` (github.com/HobbitLong/RepDistiller, the zoo of
arXiv:1910.10699; commit in each file and in tests/parity/README.md), with torch in
float64. Each holds the recipe of the random weights (every parameter and BN buffer,
regenerated here with numpy), a 4-image 32x32 input, and RepDistiller's logits and
feature list in eval mode (running statistics) and train mode (batch statistics),
plus the running statistics after the train-mode forward.

The torch state_dict is converted to our variables by name (`to_flax_variables`);
our taps map onto RepDistiller's `is_feat=True` list [f0, f1, ..., fN, f_last]:

    stem -> f0,  stageK -> fK (preact=False),  preact_stageK -> fK (preact=True),
    features -> f_last (the pooled vector),  logits -> the returned logits

The same holds for every family (resnet, wrn, vgg, mobilenetv2, shufflenet v1/v2).
"""

import glob
import os
import re
import zlib

import jax
import numpy as np
import pytest

from transferlab import models

# TRANSFERLAB_PARITY_DATA=DIR with DIR/models/ (make_model_goldens.py --seed N --out DIR/models):
# goldens drawn with other weights and inputs; else the committed ones.
_OTHER = os.path.join(os.environ.get("TRANSFERLAB_PARITY_DATA", ""), "models")
DATA = (_OTHER if os.environ.get("TRANSFERLAB_PARITY_DATA") and os.path.isdir(_OTHER)
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "data", "models"))
CASES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(DATA, "*.npz")))
EXPECTED = {"resnet8", "resnet20", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2",
            "shufflenetv1", "shufflenetv2"}
BN_MOMENTUM = 0.9  # ours; PyTorch's momentum 0.1

# Tolerance, float32 against a float64 reference, per array:
#     |ours - ref| <= RTOL * |ref| + ATOL[mode] * max|ref|.
# Eval mode (fixed affine BN): < 2e-6 * max|ref| seen on every model. Train mode
# divides by batch standard deviations over as few as 16 values per channel
# (MobileNetV2's 2x2 last stage at batch 4), which amplifies float32 rounding down
# a deep narrow net: up to 4e-5 * max|ref| seen (MobileNetV2 stage4; ShuffleNet V1 / V2
# 2.6e-5 / 1.5e-5; the others < 2e-6), and PyTorch's own float32 forward is as far from
# its float64 one there (2.4e-5; 1.6e-5 / 1.1e-5). A wiring error moves values by O(1).
RTOL = 1e-5
ATOL = {"eval": 1e-5, "train": 1e-4}

# torch state_dict leaf -> our leaf; "weight" is a conv/linear `kernel` or a BN `scale`.
LEAVES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}
IGNORED_TORCH_LEAVES = ("num_batches_tracked",)  # unused with a fixed BN momentum


def load(name):
    with np.load(os.path.join(DATA, f"{name}.npz")) as z:
        return {k: z[k] for k in z.files}


def regenerate_state_dict(golden):
    """The float32 torch state_dict the goldens were made with (see make_model_goldens.draw)."""
    seed = int(golden["seed"])
    state = {}
    for name, shape, (low, high), total in zip(golden["tensor_names"], golden["tensor_shapes"],
                                               golden["tensor_ranges"], golden["tensor_sums"]):
        name = str(name)
        shape = tuple(int(d) for d in str(shape).split(","))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        values = rng.uniform(low, high, size=shape).astype(np.float32)
        drawn = values.astype(np.float64)
        assert abs(drawn.sum() - total) <= 1e-9 * np.abs(drawn).sum(), f"numpy drew other values for {name}"
        state[name] = values
    return state


def torch_to_ours(value):
    """OIHW conv kernels -> HWIO (grouped: O, I/g -> I/g, O); Linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def variable_slots(model, x):
    """{(flat module name, leaf): (collection, path, shape)} of our params and batch_stats.

    Our path `layer2_0/downsample_0/kernel` is the slot (`layer2_0_downsample_0`, `kernel`).
    """
    shapes = jax.eval_shape(lambda inp: model.init({"params": jax.random.key(0)}, inp, train=False), x)
    slots = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            keys = tuple(p.key for p in path)
            slot = ("_".join(keys[:-1]), keys[-1])
            if slot in slots:
                raise ValueError(f"two of our variables flatten to {slot}")
            slots[slot] = (collection, keys, tuple(leaf.shape))
    return slots


def to_flax_variables(state_dict, slots):
    """Our {'params', 'batch_stats'} from a torch state_dict, matched by module name.

    A torch module path `layer2.0.downsample.0` and our path `layer2_0/downsample_0`
    both flatten to `layer2_0_downsample_0` (`slots` from `variable_slots`). Raises
    ValueError naming every torch tensor left unused and every one of our leaves
    left unfilled.
    """
    filled, unused = {}, []
    for name, value in state_dict.items():
        module, leaf = name.rsplit(".", 1)
        if leaf in IGNORED_TORCH_LEAVES:
            continue
        module = module.replace(".", "_")
        if leaf == "weight":
            ours = "kernel" if (module, "kernel") in slots else "scale"
        else:
            ours = LEAVES.get(leaf, leaf)
        slot = (module, ours)
        if slot not in slots or slot in filled:
            unused.append(name)
            continue
        collection, keys, shape = slots[slot]
        value = torch_to_ours(np.asarray(value))
        if value.shape != shape:
            raise ValueError(f"{name}: torch shape {value.shape} (converted) != ours {shape} at "
                             f"{collection}/{'/'.join(keys)}")
        filled[slot] = value
    missing = ["/".join((slots[s][0],) + slots[s][1]) for s in slots if s not in filled]
    if unused or missing:
        raise ValueError(f"torch tensors unused: {unused}; our leaves not filled: {missing}")
    variables = {"params": {}, "batch_stats": {}}
    for slot, value in filled.items():
        collection, keys, _ = slots[slot]
        node = variables[collection]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = np.asarray(value, np.float32)
    return variables


def tap_mapping(name):
    """Our tap name -> golden feature key (feat<i> / preact_feat<i>) for model `name`."""
    taps = models.tap_names(name)
    stages = sorted(int(m.group(1)) for t in taps if (m := re.fullmatch(r"stage(\d+)", t)))
    assert stages == list(range(1, len(stages) + 1)), taps
    n = len(stages)
    mapping = {"stem": "feat0", "features": f"feat{n + 1}", "logits": "logits"}
    for k in stages:
        mapping[f"stage{k}"] = f"feat{k}"
        mapping[f"preact_stage{k}"] = f"preact_feat{k}"
    assert set(mapping) == set(taps), (sorted(mapping), taps)
    return mapping


def assert_close(ours, ref, mode, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    atol = ATOL[mode] * float(np.max(np.abs(ref)))
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol, err_msg=what)


def compare_tap(golden, mode, tap, key, ours):
    """Our NHWC tap against the stored (possibly subsampled) RepDistiller map."""
    ours = np.asarray(ours, np.float64)
    index_key = key.replace("preact_", "")
    if key.startswith("preact_") and f"{mode}/{key}" not in golden:
        key = index_key  # RepDistiller returns the same map with preact=True (MobileNetV2)
    assert ours.shape == tuple(golden[f"shape/{index_key}"]), (tap, ours.shape)
    if f"{mode}/{key}_channel_mean" in golden:
        assert_close(ours.mean(axis=(0, 1, 2)), golden[f"{mode}/{key}_channel_mean"], mode,
                     f"{mode} {tap}: channel means")
    if f"index/{index_key}" in golden:
        ours = ours.reshape(-1)[golden[f"index/{index_key}"]]
    assert_close(ours, golden[f"{mode}/{key}"], mode, f"{mode} {tap}")


def test_goldens_present():
    assert EXPECTED <= set(CASES), sorted(EXPECTED - set(CASES))


def test_mobile_half_is_mobilenetv2():
    # RepDistiller's `MobileNetV2` entry is mobile_half (T=6, width 0.5); we register both names.
    assert models.create("mobile_half", num_classes=10) == models.create("mobilenetv2", num_classes=10)


def expected_running_stats(golden, state, slots):
    """Our batch_stats after one train-mode forward, from RepDistiller's updated buffers.

    PyTorch updates running_var with the unbiased batch variance (n/(n-1) times the
    biased one, n = B*H*W values per channel); ours uses the biased one
    (transferlab/models/layers.py, batch_norm). So the torch value
    m * old + (1 - m) * v * n/(n-1) is mapped back to m * old + (1 - m) * v.
    running_mean is updated the same way on both sides.
    """
    updated = {k[len("updated/"):]: v.astype(np.float64)
               for k, v in golden.items() if k.startswith("updated/")}
    assert updated
    for key in [k for k in updated if k.endswith("running_var")]:
        n = int(golden[f"bn_count/{key.rsplit('.', 1)[0]}"])
        old = state[key].astype(np.float64)
        updated[key] = BN_MOMENTUM * old + (updated[key] - BN_MOMENTUM * old) * (n - 1) / n
    return to_flax_variables({**state, **updated}, slots)["batch_stats"]


def test_conversion_fails_loudly():
    golden = load("resnet8")
    state = regenerate_state_dict(golden)
    slots = variable_slots(models.create("resnet8", num_classes=int(golden["num_classes"])),
                           golden["input"])
    with pytest.raises(ValueError, match=r"unused: \['extra.weight'\]; our leaves not filled: \[\]"):
        to_flax_variables({**state, "extra.weight": np.zeros(3, np.float32)}, slots)
    del state["layer1.0.bn2.running_var"]
    with pytest.raises(ValueError, match=r"unused: \[\]; our leaves not filled: "
                                         r"\['batch_stats/layer1_0/bn2/var'\]"):
        to_flax_variables(state, slots)


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_repdistiller(name):
    golden = load(name)
    model = models.create(name, num_classes=int(golden["num_classes"]))
    x = golden["input"]
    state = regenerate_state_dict(golden)
    slots = variable_slots(model, x)
    variables = to_flax_variables(state, slots)
    mapping = tap_mapping(name)

    # Full float32 convolutions and matmuls on every backend (GPUs default to TF32).
    with jax.default_matmul_precision("highest"):
        outputs = {mode: jax.jit(lambda v, inp, train=train: model.apply(
            v, inp, train=train, mutable=["batch_stats", "intermediates"]))(variables, x)
            for mode, train in (("eval", False), ("train", True))}
    for mode, (logits, state_out) in outputs.items():
        assert_close(logits, golden[f"{mode}/logits"], mode, f"{mode} logits")
        for tap, key in mapping.items():
            (value,) = state_out["intermediates"][tap]
            if tap == "logits":
                assert_close(value, golden[f"{mode}/logits"], mode, f"{mode} logits tap")
            else:
                compare_tap(golden, mode, tap, key, value)

    expected = expected_running_stats(golden, state, slots)
    ours = outputs["train"][1]["batch_stats"]
    for path, value in jax.tree_util.tree_flatten_with_path(ours)[0]:
        ref = expected
        for p in path:
            ref = ref[p.key]
        assert_close(value, ref, "train", "running " + "/".join(p.key for p in path))
