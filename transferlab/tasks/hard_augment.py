"""HARD-style learned hard augmentations for KD (Hard Augmentations for Robust Distillation,
arXiv:2305.14890), in the spatial-transformer form.

An augmentor network maps per-sample noise z to an affine warp
`A = I + scale * tanh(MLP(z))` of the image. Teacher and student both see the
warped batch. The augmentor is trained in the same step as the student, to
*maximize* the student's distillation loss on the warped images (the places where
teacher and student disagree) while keeping the teacher's own prediction
unchanged by the warp:

  student:   min  L_student(x_A)
  augmentor: max  L_student(x_A)  -  consistency_weight * KL(t(x) || t(x_A))

One backward pass does both: the warp parameters go through a gradient-reversal
op (`gradient_reversal`, a `jax.custom_vjp`) on the path into the student loss,
and straight into the teacher-consistency term, which only the augmentor sees.
Simplified from the paper: one shared affine augmentor (no VAE augmentor), trained
jointly rather than in alternating phases.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_vjp
def gradient_reversal(x):
    """Identity forward; negated gradient backward (Ganin & Lempitsky, arXiv:1409.7495)."""
    return x


def _gr_fwd(x):
    return x, None


def _gr_bwd(_, g):
    return (jax.tree.map(jnp.negative, g),)


gradient_reversal.defvjp(_gr_fwd, _gr_bwd)


class AffineAugmentor(nn.Module):
    """noise [B, noise_dim] -> affine matrices [B, 2, 3] near the identity."""

    hidden: int = 32
    scale: float = 0.3

    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
        delta = nn.Dense(6, name="out", kernel_init=nn.initializers.normal(0.01))(h)
        identity = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], jnp.float32)
        return (identity[None, :] + self.scale * jnp.tanh(delta)).reshape(-1, 2, 3)


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
