"""Multi-layer perceptron: flatten -> [Dense -> ReLU] * len(hidden_sizes) -> Dense.
The small-data student/teacher of the original KD experiments on MNIST (Hinton et
al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531).
PyTorch-default (kaiming-uniform) initialisation; no BatchNorm, so the variables
hold only `params`.

Taps (`intermediates` collection):
    hidden1..hiddenN     output of each hidden layer after ReLU   [B, hidden_sizes[k-1]]
    features             the last hidden output (the flattened input when there
                         are no hidden layers)                    [B, D]
    logits               float32                                  [B, num_classes]

Parameter names: fc1 ... fcN, classifier.
"""

import flax.linen as nn
import jax.numpy as jnp

from transferlab.models import layers


class MLP(nn.Module):
    """Fully connected classifier on the flattened input (arXiv:1503.02531)."""

    hidden_sizes: tuple = (256, 256)
    num_classes: int = 100
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BN or dropout
        x = x.astype(self.dtype).reshape(x.shape[0], -1)
        for k, width in enumerate(self.hidden_sizes, start=1):
            x = nn.relu(layers.dense(width, x.shape[-1], self.dtype, name=f"fc{k}")(x))
            self.sow("intermediates", f"hidden{k}", x)
        self.sow("intermediates", "features", x)
        logits = layers.dense(self.num_classes, x.shape[-1], self.dtype, name="classifier")(x)
        logits = layers.logits_f32(logits)
        self.sow("intermediates", "logits", logits)
        return logits
