"""Golden parameter counts of RepDistiller's CIFAR models (run by hand, never at test time).

Instantiates each model of RepDistiller's `models/` package (PyTorch) with
num_classes=100 and writes tests/parity/data/param_counts.json, {our name: count}.
Counts are trainable parameters only (`p.requires_grad`), i.e. conv/linear weights
and biases and BatchNorm weight/bias; BN running_mean/var/num_batches_tracked are
buffers and are excluded, matching the size of our `params` collection.

Run against RepDistiller commit b84f547c5db6a35318d4671d7d5c4de74c822403
(github.com/HobbitLong/RepDistiller, 2023-10-16), with torch 2.13.0 (CPU):

    G=<RepDistiller git dir>; D=$(mktemp -d); mkdir $D/models
    for f in $(git --git-dir=$G ls-tree --name-only HEAD models/); do
        git --git-dir=$G show HEAD:$f > $D/$f; done
    /work/peer-venv/bin/python tests/parity/param_counts.py $D/models

(The RepDistiller code is only exported to a temp dir, never committed here.)
"""

import argparse
import importlib
import json
import os
import sys

# our registry name -> RepDistiller model_dict name
NAMES = {
    "resnet8": "resnet8", "resnet14": "resnet14", "resnet20": "resnet20",
    "resnet32": "resnet32", "resnet44": "resnet44", "resnet56": "resnet56",
    "resnet110": "resnet110", "resnet8x4": "resnet8x4", "resnet32x4": "resnet32x4",
    "wrn_16_1": "wrn_16_1", "wrn_16_2": "wrn_16_2", "wrn_40_1": "wrn_40_1",
    "wrn_40_2": "wrn_40_2",
    "vgg8": "vgg8", "vgg11": "vgg11", "vgg13": "vgg13", "vgg16": "vgg16", "vgg19": "vgg19",
    "mobilenetv2": "MobileNetV2", "mobile_half": "MobileNetV2",
    "shufflenetv1": "ShuffleV1", "shufflenetv2": "ShuffleV2",
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "param_counts.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", help="path to an export of RepDistiller's models/ directory")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    models_dir = os.path.abspath(args.models_dir)
    sys.path.insert(0, os.path.dirname(models_dir))
    package = importlib.import_module(os.path.basename(models_dir))
    counts = {}
    for ours, theirs in NAMES.items():
        ctor = package.model_dict[theirs]
        model = ctor(100) if theirs == "MobileNetV2" else ctor(num_classes=100)
        counts[ours] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with open(args.out, "w") as f:
        json.dump(counts, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(counts, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
