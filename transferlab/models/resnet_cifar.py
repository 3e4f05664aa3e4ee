"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition",
arXiv:1512.03385), as defined in RepDistiller (models/resnet.py, arXiv:1910.10699):
resnet8 ... resnet110 with widths (16, 16, 32, 64) and resnet8x4 / resnet32x4 with
widths (32, 64, 128, 256); depth = 6n + 2 with n basic blocks per stage.

Stem: 3x3 conv (no bias) -> BN -> ReLU. Three stages of basic blocks (stride 1, 2, 2);
a 1x1 conv + BN projection shortcut where stride or width changes. Global average
pool, then a linear classifier. (RepDistiller uses AvgPool2d(8), which is the same
thing at 32x32 input; the global pool also accepts 28x28 or 8x8 inputs.)

Taps (`intermediates` collection):
    stem                 after conv1/bn1/ReLU            [B, H, W, w0]
    stage1..stage3       output of each stage            [B, H/s, W/s, wk]
    preact_stage1..3     the same, before the last ReLU of the stage
    features             pooled penultimate vector       [B, w3]
    logits               float32                         [B, num_classes]

`fusion_barrier` (kwarg, default True) passes each block output through
`layers.fusion_barrier` (bitwise-neutral; ~10% faster train steps on XLA:CPU; a no-op on other backends).

Parameter names follow the PyTorch modules (conv1, bn1, layer1_0/conv1, ...,
layer2_0/downsample_0, layer2_0/downsample_1, fc).
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; returns (relu(out + shortcut), out + shortcut)."""

    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    fusion_barrier: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        out = layers.conv(self.planes, 3, self.dtype, stride=self.stride, name="conv1")(x)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(out))
        out = layers.conv(self.planes, 3, self.dtype, name="conv2")(out)
        out = layers.batch_norm(train, self.dtype, name="bn2")(out)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            residual = layers.conv(self.planes, 1, self.dtype, stride=self.stride,
                                   name="downsample_0")(x)
            residual = layers.batch_norm(train, self.dtype, name="downsample_1")(residual)
        preact = out + residual
        return layers.fusion_barrier(nn.relu(preact), self.fusion_barrier), preact


class ResNetCifar(nn.Module):
    """CIFAR ResNet with basic blocks (arXiv:1512.03385), RepDistiller layout."""

    depth: int
    widths: tuple  # (stem, stage1, stage2, stage3)
    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32
    fusion_barrier: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = (self.depth - 2) // 6
        x = x.astype(self.dtype)
        x = layers.conv(self.widths[0], 3, self.dtype, name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
        self.sow("intermediates", "stem", x)
        for stage, planes in enumerate(self.widths[1:], start=1):
            for i in range(n):
                stride = 2 if (stage > 1 and i == 0) else 1
                x, preact = BasicBlock(planes, stride, self.dtype, self.fusion_barrier,
                                       name=f"layer{stage}_{i}")(x, train)
            self.sow("intermediates", f"stage{stage}", x)
            self.sow("intermediates", f"preact_stage{stage}", preact)
        x = layers.global_avg_pool(x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype, name="fc")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits


def _valid_depth(depth):
    return isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0


# name -> (depth, widths), as RepDistiller's resnet8 ... resnet32x4.
CONFIGS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
assert all(_valid_depth(d) for d, _ in CONFIGS.values())
