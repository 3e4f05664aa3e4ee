"""Forward-parity goldens of RepDistiller's CIFAR models (run by hand, never at test time).

For one model of each family, builds RepDistiller's own PyTorch module
(github.com/HobbitLong/RepDistiller `models/`, the zoo of arXiv:1910.10699),
fills every parameter and BatchNorm buffer with deterministic random values,
runs a 4-image 32x32 batch in eval mode (running statistics) and train mode
(batch statistics) with `is_feat=True` (and `preact=True` for the pre-ReLU
taps), and writes tests/parity/data/models/<our name>.npz, checked by
tests/test_model_parity.py.

Weights are not stored: tensor `name` of shape `shape` is
`np.random.default_rng([seed, zlib.crc32(name)]).uniform(low, high, shape)` rounded to
float32, with (low, high) stored per tensor (`tensor_names`, `tensor_shapes`,
`tensor_ranges`) and a float64 sum per tensor (`tensor_sums`) so a change in
numpy's stream shows up as a failed check, not as a mismatch. The torch side
runs in float64 on those float32 weights and the float32 input, so the goldens
carry only our float32 error. Stored feature maps (NHWC) larger than
FULL_LIMIT elements are a fixed random subsample of SAMPLE elements
(`index/feat<i>`, flat NHWC indices) plus the per-channel mean over
(batch, height, width) of the whole map; smaller ones are stored whole.

Run against RepDistiller commit b84f547c5db6a35318d4671d7d5c4de74c822403
(2023-10-16) with torch 2.13.0+cpu, numpy 2.4.6:

    G=<RepDistiller git dir>; mkdir -p /tmp/repdistiller
    git --git-dir=$G archive b84f547c5db6a35318d4671d7d5c4de74c822403 | tar -x -C /tmp/repdistiller
    .venv-bench/bin/python tests/parity/make_model_goldens.py --repdistiller /tmp/repdistiller

(The RepDistiller code is only imported from that checkout, never copied here. A
git clone's HEAD is checked against `--commit`; an exported tree is taken on trust.)
"""

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import zlib

import numpy as np

REPDISTILLER_COMMIT = "b84f547c5db6a35318d4671d7d5c4de74c822403"
SEED = 20240917
NUM_CLASSES = 10
BATCH = 4
FULL_LIMIT = 8192   # feature maps up to this many elements are stored whole
SAMPLE = 1024       # elements kept of larger maps
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "models")

# our registry name -> RepDistiller model_dict name (mobile_half is our alias of mobilenetv2)
CASES = {
    "resnet8": "resnet8",
    "resnet20": "resnet20",
    "resnet8x4": "resnet8x4",
    "wrn_16_2": "wrn_16_2",
    "vgg8": "vgg8",
    "mobilenetv2": "MobileNetV2",
    "shufflenetv1": "ShuffleV1",
    "shufflenetv2": "ShuffleV2",
}


def tensor_range(name, shape):
    """(low, high) of the uniform draw for one state_dict entry.

    Conv/linear weights: He-uniform over their fan-in (unit-scale activations);
    BN affine and running statistics away from their defaults (1, 0, 0, 1), so a
    mis-wired BN (wrong layer, swapped scale/bias or mean/var) changes the output.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        return -0.5, 0.5
    if leaf == "running_var":
        return 0.5, 2.0
    if leaf == "weight" and len(shape) == 1:  # BatchNorm scale
        return 0.5, 1.5
    if leaf == "weight":
        fan_in = int(np.prod(shape[1:]))
        bound = float(np.sqrt(6.0 / fan_in)) if len(shape) == 4 else float(np.sqrt(3.0 / fan_in))
        return -bound, bound
    if leaf == "bias":  # BatchNorm shift, conv (VGG) or linear bias
        return -0.3, 0.3
    raise ValueError(f"no draw rule for state_dict entry {name!r}")


def draw(seed, name, shape, low, high):
    """The float32 values of one tensor (the test regenerates them the same way)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.uniform(low, high, size=tuple(shape)).astype(np.float32)


def sample_index(seed, key, size):
    """Sorted flat indices of the elements kept of a map with `size` elements."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(size, SAMPLE, replace=False)).astype(np.int32)


def to_nhwc(t):
    a = t.detach().cpu().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def fill(model, seed):
    """Overwrite every float entry of the state_dict; returns the recipe arrays."""
    import torch

    names, shapes, ranges, sums = [], [], [], []
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("num_batches_tracked"):
                continue  # unused with a fixed momentum
            low, high = tensor_range(name, tuple(tensor.shape))
            values = draw(seed, name, tensor.shape, low, high)
            tensor.copy_(torch.from_numpy(values.astype(np.float64)))
            names.append(name)
            shapes.append(",".join(str(d) for d in tensor.shape))
            ranges.append((low, high))
            sums.append(float(values.astype(np.float64).sum()))
    return {"tensor_names": np.array(names), "tensor_shapes": np.array(shapes),
            "tensor_ranges": np.array(ranges, np.float64), "tensor_sums": np.array(sums)}


def bn_counts(model, x):
    """Elements per channel each BatchNorm normalises over (B*H*W), from one eval forward."""
    import torch

    counts, hooks = {}, []

    def record(name):
        def hook(module, inputs):
            counts[name] = inputs[0].numel() // inputs[0].shape[1]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(record(name)))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


def run(build, seed, x, train, preact):
    """A fresh model with the drawn weights, one forward; returns (feats, logits, model)."""
    import torch

    model = build()
    fill(model, seed)
    model.train(train)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True, preact=preact)
    return [to_nhwc(f) for f in feats], logits.numpy(), model


def golden(package, ours, theirs, seed, commit):
    import torch

    ctor = package.model_dict[theirs]

    def build():
        with contextlib.redirect_stdout(io.StringIO()):  # mobile_half prints its T and width
            model = ctor(NUM_CLASSES) if theirs == "MobileNetV2" else ctor(num_classes=NUM_CLASSES)
        return model.double()

    out = {"model": np.array(ours), "repdistiller_model": np.array(theirs),
           "repdistiller_commit": np.array(commit),
           "num_classes": np.array(NUM_CLASSES), "seed": np.array(seed)}
    recipe = fill(build(), seed)
    out.update(recipe)
    x_nchw = np.random.default_rng([seed, zlib.crc32(b"input")]).uniform(
        -2.0, 2.0, size=(BATCH, 3, 32, 32)).astype(np.float32)
    out["input"] = x_nchw.transpose(0, 2, 3, 1)
    x = torch.from_numpy(x_nchw.astype(np.float64))

    model = build()
    fill(model, seed)
    counts = bn_counts(model, x)
    for mode, train in (("eval", False), ("train", True)):
        # Two fresh models per mode: RepDistiller's WRN re-applies its BNs to the
        # stage outputs when preact=True, which in train mode updates their running
        # statistics a second time, so the statistics come from the preact=False run.
        feats, logits, model = run(build, seed, x, train, preact=False)
        pre_feats, pre_logits, _ = run(build, seed, x, train, preact=True)
        np.testing.assert_allclose(pre_logits, logits, rtol=1e-12, atol=0)
        out[f"{mode}/logits"] = logits
        last = len(feats) - 1
        for i, f in enumerate(feats):
            stored = {f"feat{i}": f}
            if 0 < i < last and not np.array_equal(pre_feats[i], f):
                stored[f"preact_feat{i}"] = pre_feats[i]  # absent: RepDistiller returns f
            for key, value in stored.items():
                out[f"shape/feat{i}"] = np.array(value.shape)
                if value.ndim == 4:
                    out[f"{mode}/{key}_channel_mean"] = value.mean(axis=(0, 1, 2))
                if value.size > FULL_LIMIT:
                    index = sample_index(seed, f"index/feat{i}", value.size)
                    out[f"index/feat{i}"] = index
                    value = value.reshape(-1)[index]
                out[f"{mode}/{key}"] = value.astype(np.float32)
        if train:
            for name, tensor in model.state_dict().items():
                if name.endswith(("running_mean", "running_var")):
                    out[f"updated/{name}"] = tensor.numpy().astype(np.float32)
            for name, n in counts.items():
                out[f"bn_count/{name}"] = np.array(n)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", required=True,
                        help="path to a checkout of RepDistiller (holding models/)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--commit", default=REPDISTILLER_COMMIT,
                        help="the RepDistiller commit the checkout holds (recorded in the goldens)")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    root = os.path.abspath(args.repdistiller)
    if os.path.exists(os.path.join(root, ".git")):  # a clone: check it; an archive: trust --commit
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        if head != args.commit:
            sys.exit(f"{root} is at {head}, not --commit {args.commit}")
    sys.path.insert(0, root)
    package = importlib.import_module("models")
    assert os.path.dirname(package.__file__) == os.path.join(root, "models"), package.__file__
    assert "torchvision" not in sys.modules, "RepDistiller's models must not need torchvision"
    os.makedirs(args.out, exist_ok=True)
    for ours in args.models:
        out = golden(package, ours, CASES[ours], args.seed, args.commit)
        path = os.path.join(args.out, f"{ours}.npz")
        np.savez_compressed(path, **out)
        scale = float(np.abs(out["eval/logits"]).max()), float(np.abs(out["train/logits"]).max())
        print(f"{ours:14s} {os.path.getsize(path) / 1024:7.1f} KiB  "
              f"max|logit| eval {scale[0]:.3g} train {scale[1]:.3g}")


if __name__ == "__main__":
    main()
