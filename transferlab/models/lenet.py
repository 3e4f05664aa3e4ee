"""LeNet-5 (LeCun et al., "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 1998, doi:10.1109/5.726791; no arXiv id) in its common
modern form, with BatchNorm after each conv, ReLU and max pooling.

conv 5x5, 6 channels, padding 2 (so 28x28 MNIST behaves like the paper's 32x32)
-> BN -> 2x2 max pool -> ReLU -> conv 5x5, 16 channels, no padding -> BN -> 2x2 max
pool -> ReLU -> flatten -> Dense 120 -> ReLU -> Dense 84 -> ReLU -> Dense classes.
(max pool and ReLU commute, so pooling first only lets the pre-ReLU map be tapped.)
Needs inputs of at least 12x12; convs without bias (BN follows), PyTorch-default
(kaiming-uniform) initialisation.

Taps (`intermediates` collection):
    stage1, stage2          after each conv/BN/pool/ReLU   [B, H/2, W/2, 6], [B, H', W', 16]
    preact_stage1, ..._2    the same before the ReLU
    features                output of the 84-unit layer    [B, 84]
    logits                  float32                        [B, num_classes]

Parameter names: conv1, bn1, conv2, bn2, fc1, fc2, fc3.
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab import errors
from transferlab.models import layers, native_conv

MIN_SIZE = 12


def _pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm (LeCun et al. 1998)."""

    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if min(x.shape[1], x.shape[2]) < MIN_SIZE:
            raise errors.ConfigError(
                f"model 'lenet5' needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, "
                f"got {x.shape[1]}x{x.shape[2]}")
        x = x.astype(self.dtype)
        for k, (width, pad) in enumerate(((6, 2), (16, 0)), start=1):
            conv = nn.Conv(width, (5, 5), padding=((pad, pad), (pad, pad)), use_bias=False,
                           kernel_init=layers.torch_default_kernel, dtype=self.dtype,
                           param_dtype=layers.PARAM_DTYPE, name=f"conv{k}",
                           conv_general_dilated=native_conv.conv_general_dilated)
            pre = _pool(layers.batch_norm(train, self.dtype, name=f"bn{k}")(conv(x)))
            x = nn.relu(pre)
            self.sow("intermediates", f"stage{k}", x)
            self.sow("intermediates", f"preact_stage{k}", pre)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(layers.dense(120, x.shape[-1], self.dtype, name="fc1")(x))
        x = nn.relu(layers.dense(84, x.shape[-1], self.dtype, name="fc2")(x))
        self.sow("intermediates", "features", x)
        logits = layers.logits_f32(layers.dense(self.num_classes, 84, self.dtype, name="fc3")(x))
        self.sow("intermediates", "logits", logits)
        return logits
