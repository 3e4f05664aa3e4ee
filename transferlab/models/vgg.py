"""VGG with batch norm (Simonyan & Zisserman, arXiv:1409.1556) in the CIFAR form of
RepDistiller (models/vgg.py, `vgg8_bn` ... `vgg19_bn`): five conv blocks, the FC
layers replaced by a global average pool and one linear layer.

Each block is [3x3 conv (with bias) -> BN -> ReLU] * m with the block's final ReLU
applied outside it (so the pre-ReLU output can be tapped). Block 0 is followed by
ReLU and a 2x2 max pool, blocks 1 and 2 by a max pool, block 3 by a max pool only
when the input height is 64 (RepDistiller's rule), block 4 by the global pool.
Widths per block: vgg8 [64][128][256][512][512]; vgg11 [64][128][256x2][512x2][512x2];
vgg13 [64x2][128x2][256x2][512x2][512x2]; vgg16 ... x3; vgg19 ... x4 (blocks 2-4).

Taps (`intermediates` collection), aligned with RepDistiller's feature list:
    stem                 block0 output after ReLU        [B, H, W, 64]
    stage1..stage4       block1..block4 output after ReLU
    preact_stage1..4     the same, before the ReLU
    features             pooled vector                   [B, 512]
    logits               float32                         [B, num_classes]

Parameter names follow PyTorch's Sequential indices: block0_0 (conv), block0_1 (BN),
block0_3, block0_4, ..., classifier.
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG(nn.Module):
    """CIFAR VGG-BN (arXiv:1409.1556), RepDistiller layout."""

    cfg: tuple  # five tuples of conv widths
    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32

    def _block(self, j, x, train):
        for m, width in enumerate(self.cfg[j]):
            if m > 0:
                x = nn.relu(x)
            x = layers.conv(width, 3, self.dtype, use_bias=True, name=f"block{j}_{3 * m}")(x)
            x = layers.batch_norm(train, self.dtype, name=f"block{j}_{3 * m + 1}")(x)
        return x

    @nn.compact
    def __call__(self, x, train: bool = False):
        height = x.shape[1]
        x = x.astype(self.dtype)
        x = nn.relu(self._block(0, x, train))
        self.sow("intermediates", "stem", x)
        for j in range(1, 5):
            if j < 4 or height == 64:
                x = _max_pool(x)
            pre = self._block(j, x, train)
            x = nn.relu(pre)
            self.sow("intermediates", f"stage{j}", x)
            self.sow("intermediates", f"preact_stage{j}", pre)
        x = layers.global_avg_pool(x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype,
                              kernel_init=nn.initializers.normal(0.01),
                              bias_init=nn.initializers.zeros, name="classifier")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits


CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
