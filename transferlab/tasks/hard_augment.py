"""HARD-style learned hard augmentations for KD (Hard Augmentations for Robust Distillation,
arXiv:2305.14890), in the spatial-transformer form.

An augmentor network maps per-sample noise z to an affine warp
`A = I + scale * tanh(d)`, d = MLP(z), of the image. Teacher and student both see
the warped images. The augmentor is trained in the same step as the student, to
generate images on which teacher and student *disagree* while the teacher's own
prediction stays what it is on the original image:

  student:   min  L_student(x')          (x' = x_A for a `fraction` of the batch, x for the rest; constants)
  augmentor: min  consistency_weight * KL(t(x) || t(x_A))  -  KL(t(x_A) || s(x_A))
                  + saturation_weight * mean(d^2)

The augmentor's objective reaches the warp through both models' responses to it
(their weights held constant), and is added to the step's total loss, whose only
path to the augmentor's params it is (`KDTask._hard_augment`). The last term keeps
tanh out of saturation: without it the augmentor's first large steps (the
disagreement of a young student is large) pushed d to |d| ~ 20-70, every noise
draw then gave the same extreme warp, and no gradient through the saturated tanh
could bring it back, even as the teacher's prediction on those warps stopped
matching its prediction on the originals (one seed of results/kd_schemes.md ended
at 79.3% with every image warped). Warping a fraction of each batch (default half)
keeps clean images in the student's diet as well. Simplified from the paper: one
shared affine augmentor (no VAE augmentor), trained jointly with the student
rather than in alternating phases.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class AffineAugmentor(nn.Module):
    """noise [B, noise_dim] -> (affine matrices [B, 2, 3] near the identity, their pre-tanh deviations [B, 6])."""

    hidden: int = 32
    scale: float = 0.3

    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        delta = nn.Dense(6, name="out", kernel_init=nn.initializers.normal(0.01))(h)
        identity = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], jnp.float32)
        return (identity[None, :] + self.scale * jnp.tanh(delta)).reshape(-1, 2, 3), delta


def warp(images_BHWC, theta_B23):
    """Bilinear affine warp in normalized coordinates [-1, 1] (zero outside the image)."""
    _, h, w, _ = images_BHWC.shape
    ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
    grid = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(h * w)])  # [3, HW]

    def one(image_HWC, theta_23):
        src = jnp.matmul(theta_23, grid, precision="highest")  # [2, HW] source (x, y) in [-1, 1]; float32 on GPU/TPU
        coords = jnp.stack([(src[1] + 1.0) * (h - 1) / 2.0, (src[0] + 1.0) * (w - 1) / 2.0])

        def channel(c_HW):
            return jax.scipy.ndimage.map_coordinates(c_HW, list(coords), order=1, mode="constant", cval=0.0)

        return jax.vmap(channel, in_axes=2, out_axes=1)(image_HWC).reshape(h, w, -1)

    return jax.vmap(one)(images_BHWC, theta_B23)
