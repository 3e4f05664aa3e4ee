"""ShuffleNet V1 (Zhang et al., arXiv:1707.01083) and ShuffleNet V2 (Ma et al.,
arXiv:1807.11164) in the CIFAR form of RepDistiller (models/ShuffleNetv1.py,
models/ShuffleNetv2.py: `ShuffleV1`, `ShuffleV2`). Convs and linears keep
PyTorch's default initialisation, as there.

ShuffleV1 (groups 3): 1x1 conv 3->24 -> BN -> ReLU, then three stages of
bottlenecks with output widths (240, 480, 960) and (4, 8, 4) blocks. Bottleneck:
grouped 1x1 (ungrouped when the input has 24 channels) -> BN -> ReLU -> channel
shuffle -> 3x3 depthwise -> BN -> ReLU -> grouped 1x1 -> BN; the first block of a
stage has stride 2 and concatenates a 3x3/2 average-pooled shortcut, the others
add the input; ReLU after the merge. Global average pool, linear.

ShuffleV2 (net_size 1): 1x1 conv 3->24 -> BN -> ReLU, then three stages, each a
stride-2 down block followed by (3, 7, 3) basic blocks, widths (116, 232, 464);
1x1 conv to 1024 -> BN -> ReLU, global average pool, linear. Basic block: split
channels in half, transform the second half (1x1 -> BN -> ReLU -> 3x3 dw -> BN ->
1x1 -> BN -> ReLU), concatenate, shuffle with 2 groups.

RepDistiller's AvgPool2d(4) at the end is a global pool at 32x32 input; here it is
always a global average pool.

Taps (`intermediates` collection), aligned with RepDistiller's feature list:
    stem                 after conv1/bn1/ReLU             [B, H, W, 24]
    stage1..stage3       output of each stage             [B, H/2^k, W/2^k, wk]
    preact_stage1..3     RepDistiller's `preact` of the stage's last block:
                         V1: the merged sum before the final ReLU;
                         V2: concat(x1, branch before its last ReLU), *not*
                         channel-shuffled (as in RepDistiller)
    features             pooled vector                    [B, 960] / [B, 1024]
    logits               float32                          [B, num_classes]

Parameter names follow PyTorch: conv1, bn1, layer1_0/{conv1,bn1,...}, ..., linear
(V2 also conv2, bn2).
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers


def _conv(features, kernel, dtype, stride=1, groups=1, name=None):
    return layers.conv(features, kernel, dtype, stride=stride, groups=groups,
                       kernel_init=layers.torch_default_kernel, name=name)


class ShuffleV1Block(nn.Module):
    """ShuffleNet V1 bottleneck; returns (relu(merged), merged)."""

    out_planes: int  # width of the residual branch (stage width minus input for stride 2)
    stride: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        mid = self.out_planes // 4
        g = 1 if x.shape[-1] == 24 else self.groups
        out = _conv(mid, 1, self.dtype, groups=g, name="conv1")(x)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(out))
        out = layers.channel_shuffle(out, g)
        out = _conv(mid, 3, self.dtype, stride=self.stride, groups=mid, name="conv2")(out)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="bn2")(out))
        out = _conv(self.out_planes, 1, self.dtype, groups=self.groups, name="conv3")(out)
        out = layers.batch_norm(train, self.dtype, name="bn3")(out)
        if self.stride == 2:
            res = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                              count_include_pad=True)
            preact = jnp.concatenate([out, res], axis=-1)
        else:
            preact = out + x
        return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 (arXiv:1707.01083), RepDistiller `ShuffleV1` layout."""

    num_classes: int = 100
    out_planes: tuple = (240, 480, 960)
    num_blocks: tuple = (4, 8, 4)
    groups: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = _conv(24, 1, self.dtype, name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
        self.sow("intermediates", "stem", x)
        for stage, (planes, n) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
            for i in range(n):
                branch = planes - x.shape[-1] if i == 0 else planes
                x, preact = ShuffleV1Block(branch, 2 if i == 0 else 1, self.groups,
                                           self.dtype, name=f"layer{stage}_{i}")(x, train)
            self.sow("intermediates", f"stage{stage}", x)
            self.sow("intermediates", f"preact_stage{stage}", preact)
        x = layers.global_avg_pool(x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype, name="linear")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 basic block; returns (shuffled output, unshuffled pre-ReLU concat)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        out = _conv(c, 1, self.dtype, name="conv1")(x2)
        out = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(out))
        out = _conv(c, 3, self.dtype, groups=c, name="conv2")(out)
        out = layers.batch_norm(train, self.dtype, name="bn2")(out)
        out = _conv(c, 1, self.dtype, name="conv3")(out)
        pre = layers.batch_norm(train, self.dtype, name="bn3")(out)
        out = jnp.concatenate([x1, nn.relu(pre)], axis=-1)
        return layers.channel_shuffle(out, 2), jnp.concatenate([x1, pre], axis=-1)


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNet V2 stride-2 block: two branches of out_channels // 2, concat, shuffle."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        cin, mid = x.shape[-1], self.out_channels // 2
        left = _conv(cin, 3, self.dtype, stride=2, groups=cin, name="conv1")(x)
        left = layers.batch_norm(train, self.dtype, name="bn1")(left)
        left = _conv(mid, 1, self.dtype, name="conv2")(left)
        left = nn.relu(layers.batch_norm(train, self.dtype, name="bn2")(left))
        right = _conv(mid, 1, self.dtype, name="conv3")(x)
        right = nn.relu(layers.batch_norm(train, self.dtype, name="bn3")(right))
        right = _conv(mid, 3, self.dtype, stride=2, groups=mid, name="conv4")(right)
        right = layers.batch_norm(train, self.dtype, name="bn4")(right)
        right = _conv(mid, 1, self.dtype, name="conv5")(right)
        right = nn.relu(layers.batch_norm(train, self.dtype, name="bn5")(right))
        return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


# RepDistiller's ShuffleNetV2 configs: net_size -> (out_channels, num_blocks).
V2_CONFIGS = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 (arXiv:1807.11164), RepDistiller `ShuffleV2` layout."""

    num_classes: int = 100
    net_size: float = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        out_channels, num_blocks = V2_CONFIGS[self.net_size]
        x = x.astype(self.dtype)
        x = _conv(24, 1, self.dtype, name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
        self.sow("intermediates", "stem", x)
        for stage, (width, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            x = ShuffleV2DownBlock(width, self.dtype, name=f"layer{stage}_0")(x, train)
            for i in range(1, n + 1):
                x, preact = ShuffleV2Block(self.dtype, name=f"layer{stage}_{i}")(x, train)
            self.sow("intermediates", f"stage{stage}", x)
            self.sow("intermediates", f"preact_stage{stage}", preact)
        x = _conv(out_channels[3], 1, self.dtype, name="conv2")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="bn2")(x))
        x = layers.global_avg_pool(x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype, name="linear")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits
