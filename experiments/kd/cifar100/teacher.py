"""CIFAR-100 teachers (and from-scratch student baselines) with the benchmark's recipe.

`model=NAME` (default resnet32x4) trains any model from labels with the
recipe of the KD rows in this folder (`transferlab.methods.cifar100_base`,
the teacher recipe of RepDistiller, arXiv:1910.10699 / mdistiller,
arXiv:2203.08679): 240 epochs at batch 64, SGD lr 0.05 (0.01 for
MobileNetV2 / ShuffleNets), momentum 0.9, weight decay 5e-4, lr x0.1 at epochs
150/180/210, pad-4 crop + flip, CE only. The resnet56 / resnet110 / resnet32x4
/ wrn_40_2 / vgg13 teachers are the architectures of He et al.
(arXiv:1512.03385), Zagoruyko & Komodakis (arXiv:1605.07146) and Simonyan &
Zisserman (arXiv:1409.1556). Selection: the last step; periodic evaluation on
the test split is monitoring only. The KD rows read the teacher from
runs/cifar100/<model> by default:

  python -m transferlab.main --config experiments/kd/cifar100/teacher.py:model=resnet32x4 --workdir runs/cifar100/resnet32x4
  python -m transferlab.main --config experiments/kd/cifar100/teacher.py:model=resnet8x4 --workdir runs/cifar100/resnet8x4
"""

from transferlab.config import parse_arg
from transferlab.errors import ConfigError
from transferlab.methods import cifar100_base


def get_config(arg=None):
    args = parse_arg(arg)
    if set(args) - {"model"}:
        raise ConfigError(f"config argument: expected model=NAME, got {sorted(args)}")
    return cifar100_base(args.get("model", "resnet32x4"))
