"""Feature-level distillation losses: FitNet hints, attention transfer, ND loss and
ReviewKD's hierarchical context loss; plus the array helpers they share.

Feature maps are NHWC [B, H, W, C]; pooled features [B, D].
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from transferlab.losses.registry import (batch_mean, check_pairs, check_same_shape, f32, labels_of, register,
                                        sample_weights)

STAGES = ("stage1", "stage2", "stage3")


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(|x|_2, eps) along `axis` (torch's F.normalize), with a finite gradient at x = 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] averaging matrix of torch's adaptive_avg_pool (floor/ceil bin edges)."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x, out_hw):
    """NHWC [B, H, W, C] -> [B, h, w, C], as torch.nn.functional.adaptive_avg_pool2d."""
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_hw[0]))
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_hw[1]))
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision="highest")  # float32 on GPU/TPU too


def as_map(x):
    """A pooled feature [B, D] as a 1x1 map [B, 1, 1, D]; maps pass through."""
    return x[:, None, None, :] if x.ndim == 2 else x


def per_sample_mse(a, b):
    """[B] mean squared difference over all non-batch axes."""
    d = a - b
    return jnp.mean(d.reshape(d.shape[0], -1) ** 2, axis=-1)


@register("fitnet", taps=("stage2", "stage2"), connector="conv1x1_bn")
def fitnet(student, teacher, batch):
    """FitNets hint loss, arXiv:1412.6550.

    loss = mean_b mean_{h,w,c} (r(s)_bhwc - t_bhwc)^2, where r is the regressor the
    caller applies to the student tap (connector 'conv1x1_bn'), i.e. F.mse_loss
    (mean reduction) of the reference code. The paper's 1/2 factor is left to the
    term weight (mdistiller uses 100 on CIFAR-100).
    """
    check_same_shape("fitnet", student, teacher)
    return batch_mean(per_sample_mse(f32(student), f32(teacher)), batch)


def attention_map(f, p):
    """[B, H*W]: L2-normalized mean over channels of |f|^p."""
    a = jnp.mean((f * jnp.sign(f)) ** p, axis=-1)  # |f| with torch's zero subgradient at 0 (matters for p = 1)
    return l2_normalize(a.reshape(a.shape[0], -1))


@register("at", taps=(STAGES, STAGES), multi_tap=True)
def at(student, teacher, batch, *, p=2.0, beta=1000.0):
    """Attention transfer, arXiv:1612.03928 (activation-based, authors' code variant).

    For each stage j, Q(f) = normalize_2(mean_c |f|^p) flattened over H*W, and
      loss = beta * sum_j mean_{b, hw} (Q(s_j)_b,hw - Q(t_j)_b,hw)^2
    This is the authors' implementation (github.com/szagoruyko/attention-transfer,
    `utils.at_loss`, summed over groups times `--beta 1e3` in `cifar.py`), which
    mdistiller and torchdistill's ATLoss(mode='code') also follow; the paper's Eq. 2
    instead uses beta/2 times the unsquared p-norm of the difference. Default p = 2,
    beta = 1000. Where a stage's spatial sizes differ the larger map is adaptive-
    average-pooled to the smaller one (as mdistiller). Channels may differ.
    """
    check_pairs("at", student, teacher)
    total = 0.0
    for fs, ft in zip(student, teacher):
        fs, ft = f32(fs), f32(ft)
        hw = (min(fs.shape[1], ft.shape[1]), min(fs.shape[2], ft.shape[2]))
        fs = fs if fs.shape[1:3] == hw else adaptive_avg_pool(fs, hw)
        ft = ft if ft.shape[1:3] == hw else adaptive_avg_pool(ft, hw)
        total = total + batch_mean(per_sample_mse(attention_map(fs, p), attention_map(ft, p)), batch)
    return beta * total


@register("nd", taps=("features", "features"), connector="linear", reads_label=True)
def nd(student, teacher, batch, *, class_means=None):
    """ND (feature norm and direction) loss, arXiv:2305.17007 (needs batch['label']).

    With c_y the teacher's class-mean feature of the sample's label:
      loss = mean_b [ 1 - <s_b, c_yb / |c_yb|> / max(|s_b|, |t_b|) ]
    as the authors' DirectNormLoss (github.com/WangYZ1608/Knowledge-Distillation-via-ND).
    `class_means` [K, D]: the teacher's class means over the training set, as in the
    paper (computed once before training). When it is None, c_y is the mean teacher
    feature of the same-label samples in the current batch (an in-batch estimate,
    noisier with few samples per class). The student feature must have the teacher's
    width (connector 'linear').
    """
    check_same_shape("nd", student, teacher)
    s, t = f32(student), f32(teacher)
    y = labels_of(batch, "nd")
    if class_means is None:
        w = sample_weights(batch, s.shape[0])
        same = (y[:, None] == y[None, :]).astype(jnp.float32) * w[None, :]
        centers = (same @ t) / jnp.maximum(jnp.sum(same, axis=-1, keepdims=True), 1e-12)
    else:
        centers = f32(class_means)[y]
    direction = l2_normalize(centers)
    norm_s = jnp.sqrt(jnp.sum(s * s, -1) + 1e-20)
    norm_t = jnp.sqrt(jnp.sum(t * t, -1))
    # max(|s|, |t|) as the authors' Python `max(s_norm, t_norm)`: a tie takes the student's norm
    # (jnp.maximum would split the gradient, e.g. for a student initialised from the teacher)
    return batch_mean(1.0 - jnp.sum(s * direction, -1) / jnp.where(norm_s >= norm_t, norm_s, norm_t), batch)


def hcl(fs, ft, pool_sizes, batch):
    """Hierarchical context loss of one feature pair (ReviewKD): pyramid-pooled MSE."""
    fs, ft = as_map(f32(fs)), as_map(f32(ft))
    loss = batch_mean(per_sample_mse(fs, ft), batch)
    weight, total = 1.0, 1.0
    for k in pool_sizes:
        if k >= fs.shape[1]:
            continue
        weight /= 2.0
        pooled = per_sample_mse(adaptive_avg_pool(fs, (k, k)), adaptive_avg_pool(ft, (k, k)))
        loss = loss + weight * batch_mean(pooled, batch)
        total += weight
    return loss / total


@register("reviewkd", taps=(STAGES + ("features",), tuple(f"preact_{s}" for s in STAGES) + ("features",)),
          connector="abf", multi_tap=True)
def reviewkd(student, teacher, batch, *, pool_sizes=(4, 2, 1)):
    """ReviewKD hierarchical context loss (HCL), arXiv:2104.09044.

    `student`: the ABF-fused student features (connector 'abf', already in the
    teacher's shapes); `teacher`: the teacher's features, shallow to deep. Per pair,
    with P_k adaptive average pooling to k x k and only the levels k < H used:
      hcl(f, g) = [mse(f, g) + sum_{i} 2^-i mse(P_{k_i} f, P_{k_i} g)] / (1 + sum_i 2^-i)
      loss = sum_pairs hcl
    (mse = mean over all elements). Pooled [B, D] features count as 1x1 maps.
    Default taps follow mdistiller's CIFAR recipe: student stage outputs + pooled
    features, teacher pre-activation stages + pooled features.
    """
    check_pairs("reviewkd", student, teacher)
    for fs, ft in zip(student, teacher):
        check_same_shape("reviewkd", fs, ft)
    return sum(hcl(fs, ft, pool_sizes, batch) for fs, ft in zip(student, teacher))
