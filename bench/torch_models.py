"""PyTorch CIFAR ResNets for the peer side of bench/kd_step.py.

Written for this benchmark (not copied from RepDistiller), with the same layout as
RepDistiller's `models/resnet.py` (arXiv:1910.10699) and as
`transferlab/models/resnet_cifar.py`: depth = 6n + 2, a 3x3 stem conv -> BN -> ReLU,
three stages of n basic blocks (strides 1, 2, 2) with a 1x1 conv + BN projection
shortcut where the stride or the width changes, global average pooling, a linear
classifier. resnet8 ... resnet56 have widths (16, 16, 32, 64); resnet8x4 and
resnet32x4 have (32, 64, 128, 256).

    python bench/torch_models.py      # prints the parameter count of each model

`parameter_count` counts trainable parameters only (BN running statistics are
buffers), the same quantity as the size of a flax `params` collection.
"""

from __future__ import annotations

import torch
from torch import nn

# name -> (depth, (stem, stage1, stage2, stage3) widths)
CONFIGS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class Block(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); shortcut = 1x1 conv + BN on a shape change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for k, cout in enumerate(widths[1:]):
            blocks = []
            for i in range(n):
                blocks.append(Block(cin, cout, 2 if (k > 0 and i == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():  # RepDistiller's init: kaiming fan_out for convs, BN = (1, 0)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def create(name: str, num_classes: int = 100) -> CifarResNet:
    depth, widths = CONFIGS[name]
    return CifarResNet(depth, widths, num_classes)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    for _name in CONFIGS:
        print(f"{_name:12s} {parameter_count(create(_name)):>10,d}")
