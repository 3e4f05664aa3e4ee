"""MobileNetV2 (Sandler et al., arXiv:1801.04381) in the CIFAR form of RepDistiller
(models/mobilenetv2.py, from "Knowledge Distillation via Route Constrained
Optimization", arXiv:1904.09149). `mobilenetv2` / `mobile_half` is RepDistiller's
`mobile_half`: expansion T = 6, width multiplier 0.5.

Stem: 3x3 conv, stride 2 -> BN -> ReLU. Seven groups of inverted residual blocks
(t, c, n, s) = (1,16,1,1) (T,24,2,1) (T,32,3,2) (T,64,4,2) (T,96,3,1) (T,160,3,2)
(T,320,1,1), channels int(c * width). Every block has the 1x1 expansion conv, also
when t = 1 (as in RepDistiller, unlike torchvision). Then a 1x1 conv to 1280
channels (int(1280 * width) if width > 1) -> BN -> ReLU, global average pool
(RepDistiller: AvgPool2d(input_size // 16, ceil_mode=True), the same at 32x32) and
a linear classifier.

Taps (`intermediates` collection), aligned with RepDistiller's feature list:
    stem                 after conv1 (stride 2)           [B, H/2, W/2, 16]
    stage1               after block group 1              [B, H/2, W/2, 12]
    stage2               after block group 2              [B, H/4, W/4, 16]
    stage3               after block group 4              [B, H/8, W/8, 48]
    stage4               after block group 6              [B, H/16, W/16, 160]
    preact_stage1..4     same as stageK (blocks end in a linear BN, no ReLU)
    features             pooled vector                    [B, 1280]
    logits               float32                          [B, num_classes]
(shapes for the default width 0.5.)

Parameter names follow PyTorch: conv1_0, conv1_1, blocks_0_0/conv_0 ... conv_7,
conv2_0, conv2_1, classifier_0.
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers

# (expansion or None for T, channels, blocks, stride)
SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
# block group index -> stage tap name
STAGE_AFTER_GROUP = {1: 1, 2: 2, 4: 3, 6: 4}


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise -> BN -> ReLU -> 1x1 -> BN (+ x)."""

    out_planes: int
    stride: int
    expand_ratio: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = x.shape[-1] * self.expand_ratio
        out = layers.conv(hidden, 1, self.dtype, name="conv_0")(x)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="conv_1")(out))
        out = layers.conv(hidden, 3, self.dtype, stride=self.stride, groups=hidden,
                          name="conv_3")(out)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="conv_4")(out))
        out = layers.conv(self.out_planes, 1, self.dtype, name="conv_6")(out)
        out = layers.batch_norm(train, self.dtype, name="conv_7")(out)
        if self.stride == 1 and x.shape[-1] == self.out_planes:
            out = x + out
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (arXiv:1801.04381), RepDistiller layout."""

    num_classes: int = 100
    width_mult: float = 0.5
    expand_ratio: int = 6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = layers.conv(int(32 * self.width_mult), 3, self.dtype, stride=2, name="conv1_0")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="conv1_1")(x))
        self.sow("intermediates", "stem", x)
        for g, (t, c, n, s) in enumerate(SETTING):
            t = self.expand_ratio if t is None else t
            for i in range(n):
                x = InvertedResidual(int(c * self.width_mult), s if i == 0 else 1, t,
                                     self.dtype, name=f"blocks_{g}_{i}")(x, train)
            if g in STAGE_AFTER_GROUP:
                k = STAGE_AFTER_GROUP[g]
                self.sow("intermediates", f"stage{k}", x)
                self.sow("intermediates", f"preact_stage{k}", x)
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = layers.conv(last, 1, self.dtype, name="conv2_0")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="conv2_1")(x))
        x = layers.global_avg_pool(x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype,
                              kernel_init=nn.initializers.normal(0.01),
                              bias_init=nn.initializers.zeros, name="classifier_0")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits
