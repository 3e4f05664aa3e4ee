"""Wide Residual Networks (Zagoruyko & Komodakis, arXiv:1605.07146), as defined
in RepDistiller (models/wrn.py): WRN-d-k with widths (16, 16k, 32k, 64k),
(d - 4) / 6 pre-activation basic blocks per stage, strides (1, 2, 2), no dropout.

Stem: a single 3x3 conv (no BN/ReLU). Each block: BN -> ReLU -> conv3x3 -> BN ->
ReLU -> conv3x3, plus identity or (when widths differ) a 1x1 conv shortcut taken
from the activated input. After the last stage: BN -> ReLU -> global average pool
-> linear (RepDistiller: AvgPool2d(8), the same at 32x32 input).

Taps (`intermediates` collection):
    stem                 output of conv1                 [B, H, W, 16]
    stage1..stage3       output of each stage (pre-activation blocks, so no ReLU)
    preact_stage1..3     RepDistiller's `preact` features: the stage output after
                         the BN that follows it (bn1 of the next stage's first
                         block, or the final bn1) and before that BN's ReLU; these
                         are the pre-ReLU features OFD / ReviewKD use
    features             pooled penultimate vector       [B, 64k]
    logits               float32                         [B, num_classes]

`fusion_barrier` (kwarg, default True) passes each block output through
`layers.fusion_barrier` (bitwise-neutral; ~10% faster train steps on XLA:CPU; a no-op on other backends).

Parameter names follow PyTorch: conv1, block1_layer_0/{bn1,conv1,bn2,conv2,
convShortcut}, ..., bn1, fc.
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers


class WideBasicBlock(nn.Module):
    """Pre-activation basic block; returns (output, bn1(input) before its ReLU)."""

    out_planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    fusion_barrier: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        equal_in_out = x.shape[-1] == self.out_planes
        pre = layers.batch_norm(train, self.dtype, name="bn1")(x)
        act = nn.relu(pre)
        out = layers.conv(self.out_planes, 3, self.dtype, stride=self.stride, name="conv1")(act)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="bn2")(out))
        out = layers.conv(self.out_planes, 3, self.dtype, name="conv2")(out)
        if equal_in_out:
            shortcut = x
        else:
            shortcut = layers.conv(self.out_planes, 1, self.dtype, stride=self.stride,
                                   name="convShortcut")(act)
        return layers.fusion_barrier(shortcut + out, self.fusion_barrier), pre


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (arXiv:1605.07146), RepDistiller layout."""

    depth: int = 16
    widen_factor: int = 1
    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32
    fusion_barrier: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = (self.depth - 4) // 6
        k = self.widen_factor
        widths = (16 * k, 32 * k, 64 * k)
        x = x.astype(self.dtype)
        x = layers.conv(16, 3, self.dtype, name="conv1")(x)
        self.sow("intermediates", "stem", x)
        for stage, planes in enumerate(widths, start=1):
            for i in range(n):
                stride = 2 if (stage > 1 and i == 0) else 1
                x, pre = WideBasicBlock(planes, stride, self.dtype, self.fusion_barrier,
                                        name=f"block{stage}_layer_{i}")(x, train)
                if stage > 1 and i == 0:
                    self.sow("intermediates", f"preact_stage{stage - 1}", pre)
            self.sow("intermediates", f"stage{stage}", x)
        pre = layers.batch_norm(train, self.dtype, name="bn1")(x)
        self.sow("intermediates", "preact_stage3", pre)
        x = layers.global_avg_pool(nn.relu(pre))
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype,
                              bias_init=nn.initializers.zeros, name="fc")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits


# name -> (depth, widen_factor), as RepDistiller's wrn_16_1 ... wrn_40_2.
CONFIGS = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}
