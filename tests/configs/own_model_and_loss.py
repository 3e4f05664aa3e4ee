"""A config that brings its own student model and its own loss (tests/test_experiments.py).

    python -m transferlab.main --config tests/configs/own_model_and_loss.py --workdir runs/own
    python -m transferlab.export --workdir runs/own --out runs/own_export --config tests/configs/own_model_and_loss.py
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from transferlab import losses, models
from transferlab.config import parse_arg


class TinyConv(nn.Module):
    """One 3x3 conv, global average pooling, a linear head; sows the taps the losses read."""

    num_classes: int
    dtype: object = jnp.float32
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype)(x))
        self.sow("intermediates", "stage1", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
        self.sow("intermediates", "logits", logits)
        return logits


models.register("tinyconv", lambda num_classes, dtype, width: TinyConv(num_classes, dtype, int(width)), {"width": 8})


@losses.register("l2_logits", taps=("logits", "logits"))
def l2_logits(student, teacher, batch, *, scale=1.0):
    """Mean squared distance between logits (Ba & Caruana, "Do Deep Nets Really Need to be Deep?",
    arXiv:1312.6184)."""
    return scale * jnp.mean(jnp.sum((student - teacher) ** 2, axis=-1))


def get_config(arg=None):
    parse_arg(arg, allowed=())
    c = ml_collections.ConfigDict()
    c.dataset = {"name": "digits"}
    c.total_steps = 6
    c.batch_size = 32
    c.eval_every_steps = 0
    c.task = "kd"
    c.model = {"name": "tinyconv", "kwargs": {"width": 16}}
    c.teacher = {"name": "mlp", "checkpoint": "random"}
    c.distill = {"terms": ({"name": "l2_logits", "weight": 0.1, "scale": 2.0},
                           {"name": "fitnet", "student_tap": "features", "teacher_tap": "features",
                            "connector": "linear"})}
    return c
