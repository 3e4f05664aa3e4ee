"""Logit-level distillation losses: KD, DKD, DIST, logit standardization, born-again
(CWTM, DKPP), class-relation KD and the trilateral-geometry adaptive KD weighting.

All take student / teacher logits [B, C] and return float32 scalars averaged
over the valid samples of the batch (`batch['mask']`, when present).
Notation: p = softmax(z / T), KL(p || q) = sum_c p_c (log p_c - log q_c).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from transferlab import errors
from transferlab.losses.registry import batch_mean, f32, labels_of, norm_or_zero, register, sample_weights

LOGITS = ("logits", "logits")
_NEG = -1e9  # masks a class out of a softmax without producing inf * 0


def kl_rows(teacher_logits, student_logits):
    """[B] KL(softmax(teacher) || softmax(student)) per row, 0 log 0 = 0."""
    log_p_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits, axis=-1)
    p_t = jnp.exp(log_p_t)
    return jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)


def cross_entropy_rows(logits, labels):
    """[B] cross-entropy of integer `labels` under softmax(`logits`)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


@register("kd", taps=LOGITS)
def kd(student, teacher, batch, *, temperature=4.0):
    """Hinton KD, arXiv:1503.02531.

    loss = T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))   (batchmean KL)

    The T^2 keeps gradient magnitudes independent of T (paper, Sec. 2). torchdistill's
    `KDLoss` returns the KL without T^2 unless combined with CE (alpha > 0); ours always
    includes it (tests/test_loss_parity.py pins ours == T^2 * torchdistill). Default
    T = 4 as in mdistiller's CIFAR-100 recipe.
    """
    t = temperature
    return t ** 2 * batch_mean(kl_rows(f32(teacher) / t, f32(student) / t), batch)


@register("dkd", taps=LOGITS, reads_label=True)
def dkd(student, teacher, batch, *, alpha=1.0, beta=8.0, temperature=4.0):
    """Decoupled KD, arXiv:2203.08679 (label-dependent; needs batch['label']).

    With p = softmax(z / T) and g the label:
      b = [p_g, sum_{c != g} p_c]                       (binary target / non-target)
      TCKD = KL(b^t || b^s)
      NCKD = KL(softmax_{c != g}(t / T) || softmax_{c != g}(s / T))
      loss = T^2 * mean_b (alpha * TCKD + beta * NCKD)
    Defaults alpha=1, beta=8, T=4 (paper / mdistiller CIFAR-100). The warm-up ramp
    of the reference is the task's `warmup_steps`, not part of the loss. b is formed
    in log space (log p_g and the log-sum-exp of the other classes): the reference's
    probabilities underflow in float32 once a logit gap exceeds ~87 T (inf loss).
    """
    s, t = f32(student) / temperature, f32(teacher) / temperature
    gt = jax.nn.one_hot(labels_of(batch, "dkd"), s.shape[-1], dtype=jnp.bool_)

    def log_binary(z):
        # log b in log space: the reference's log(p_g) and log(sum_{c != g} p_c) of the
        # probabilities underflow (inf loss, NaN gradient) once a logit gap exceeds ~87 T.
        log_p = jax.nn.log_softmax(z, axis=-1)
        target = jnp.sum(jnp.where(gt, log_p, 0.0), -1)
        return jnp.stack([target, jax.nn.logsumexp(jnp.where(gt, -jnp.inf, log_p), axis=-1)], -1)

    log_b_s, log_b_t = log_binary(s), log_binary(t)
    b_t = jnp.exp(log_b_t)
    tckd = jnp.sum(jnp.where(b_t > 0, b_t * (log_b_t - log_b_s), 0.0), axis=-1)
    nckd = kl_rows(jnp.where(gt, _NEG, t), jnp.where(gt, _NEG, s))
    return temperature ** 2 * batch_mean(alpha * tckd + beta * nckd, batch)


def _pearson_rows(a, b, w, eps, eps_mode="add"):
    """[R] Pearson correlation of each row of a and b over its columns, with column weights w [K].
    eps_mode 'add': <a, b> / (|a| |b| + eps); 'clamp': <a, b> / (max(|a|, eps) max(|b|, eps)), the clamp
    left out of the gradient (torch's `cosine_similarity`). Over at most one weighted column (one valid
    sample, for the per-class correlations) the centred rows are zero and the correlation is 0, without
    gradient: rounding residues of the centring would otherwise meet a 1/eps."""
    n = jnp.maximum(jnp.sum(w), 1.0)
    a = (a - jnp.sum(a * w[None, :], -1, keepdims=True) / n) * w[None, :]
    b = (b - jnp.sum(b * w[None, :], -1, keepdims=True) / n) * w[None, :]
    norm_a, norm_b = norm_or_zero(a), norm_or_zero(b)
    if eps_mode == "add":
        rho = jnp.sum(a * b, -1) / (norm_a * norm_b + eps)
    else:
        clamp = lambda x: x + jax.lax.stop_gradient(jnp.maximum(x, eps) - x)  # noqa: E731
        rho = jnp.sum(a * b, -1) / (clamp(norm_a) * clamp(norm_b))
    return jnp.where(jnp.sum(w) > 1.0, rho, 0.0)


@register("dist", taps=LOGITS, choices={"eps_mode": ("add", "clamp")})
def dist(student, teacher, batch, *, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8, eps_mode="add"):
    """DIST (KD from a stronger teacher), arXiv:2205.10536.

    With Y = softmax(Z / tau) [B, C] and rho(u, v) = <u - mean u, v - mean v> /
    (|u - mean u| |v - mean v| + eps) (the authors' code):
      inter = 1 - mean_b rho(Y^s_b,:, Y^t_b,:)        (per sample, across classes)
      intra = 1 - mean_c rho(Y^s_:,c, Y^t_:,c)        (per class, across the batch)
      loss = tau^2 * (beta * inter + gamma * intra)
    Masked samples are left out of both (the intra correlations run over valid rows).

    `eps_mode='clamp'` divides by the norms clamped at eps instead, as torchdistill's
    `DISTLoss` does (through torch's `cosine_similarity`): for norms above eps that is no eps
    at all. The two differ where a softmax row or column is nearly flat, so that |u| |v| is
    not large next to eps (many classes, tau > 1, small logits): 1e-5 relative in the
    gradient at 1,000 classes, more on a batch of a few samples.
    """
    s = jax.nn.softmax(f32(student) / tau, axis=-1)
    t = jax.nn.softmax(f32(teacher) / tau, axis=-1)
    w = sample_weights(batch, s.shape[0])
    ones_c = jnp.ones((s.shape[1],), jnp.float32)
    inter = 1.0 - batch_mean(_pearson_rows(s, t, ones_c, eps, eps_mode), batch)
    intra = 1.0 - jnp.mean(_pearson_rows(s.T, t.T, w, eps, eps_mode))
    return tau ** 2 * (beta * inter + gamma * intra)


def standardize(logits, eps=1e-7):
    """(z - mean z) / (eps + std z) per row, std with Bessel's correction as torch.std."""
    n = logits.shape[-1]
    centered = logits - jnp.mean(logits, axis=-1, keepdims=True)
    var = jnp.sum(centered * centered, axis=-1, keepdims=True) / (n - 1)
    return centered / (eps + jnp.sqrt(jnp.maximum(var, 1e-30)))


@register("kd_std", taps=LOGITS)
def kd_std(student, teacher, batch, *, temperature=2.0, eps=1e-7):
    """KD with logit standardization, arXiv:2403.01427.

    z-score each logit vector, Z(z) = (z - mean(z)) / (eps + std(z)) (unbiased std,
    as the authors' code and torchdistill), then Hinton KD at base temperature T:
      loss = T^2 * mean_b KL(softmax(Z(t_b) / T) || softmax(Z(s_b) / T))
    Default T = 2 (torchdistill's LogitStdKDLoss example). torchdistill returns the KL
    without T^2 when alpha is None; ours includes it (pinned in the parity test).
    With 2 classes every standardized row is (1, -1) or (-1, 1): the loss then only sees
    which logit is larger, and its gradient is zero up to rounding (use `kd` there).
    """
    s, t = standardize(f32(student), eps), standardize(f32(teacher), eps)
    return temperature ** 2 * batch_mean(kl_rows(t / temperature, s / temperature), batch)


@register("cwtm", taps=LOGITS, reads_label=True)
def cwtm(student, teacher, batch):
    """Confidence-Weighted by Teacher Max (born-again networks), arXiv:1805.04770.

    Per-sample cross-entropy with the true label, weighted by the teacher's max
    probability normalized over the (valid) batch:
      m_b = max_c softmax(t_b)_c,   loss = sum_b [m_b / sum_u m_u] * CE(s_b, y_b)
    The weights sum to one, so this is a weighted mean of the per-sample CE. No hparams.
    """
    y = labels_of(batch, "cwtm")
    m = jnp.max(jax.nn.softmax(f32(teacher), axis=-1), axis=-1) * sample_weights(batch, y.shape[0])
    return jnp.sum(m * cross_entropy_rows(f32(student), y)) / jnp.maximum(jnp.sum(m), 1e-12)


def permute_non_argmax(probs, key):
    """`probs` [B, C] with each row's non-argmax entries randomly permuted; the argmax stays put.

    Per row: random sort keys put the argmax first and the other classes in a random
    order; the values of the other classes, in class order, are written to those
    positions. Deterministic in `key`.
    """
    b, c = probs.shape
    top = jax.nn.one_hot(jnp.argmax(probs, axis=-1), c, dtype=jnp.bool_)
    rand = jnp.where(top, -1.0, jax.random.uniform(key, (b, c)))
    ident = jnp.where(top, -1.0, jnp.broadcast_to(jnp.arange(c, dtype=jnp.float32)[None, :], (b, c)))
    dest = jnp.argsort(rand, axis=-1)  # k-th slot -> destination class
    src = jnp.argsort(ident, axis=-1)  # k-th slot -> source class
    inv_dest = jnp.argsort(dest, axis=-1)  # class -> its slot
    return jnp.take_along_axis(probs, jnp.take_along_axis(src, inv_dest, axis=-1), axis=-1)


@register("dkpp", taps=LOGITS)
def dkpp(student, teacher, batch, *, temperature=1.0, seed=0):
    """Dark Knowledge with Permuted Predictions (born-again networks), arXiv:1805.04770.

    q_b = pi_b(softmax(t_b / T)), where pi_b permutes every class except the teacher's
    argmax (which keeps its probability), then
      loss = T^2 * mean_b KL(q_b || softmax(s_b / T))
    Permutation source: `batch['rng']` (a jax PRNG key; fold in the step to get a
    fresh permutation each step) when present, else `jax.random.PRNGKey(seed)`; the
    same inputs and key always give the same permutation. Default T = 1 (BAN uses
    plain softmax outputs).
    """
    key = batch.get("rng") if batch is not None else None
    key = jax.random.PRNGKey(seed) if key is None else key
    s, t = f32(student) / temperature, f32(teacher) / temperature
    q = permute_non_argmax(jax.nn.softmax(t, axis=-1), key)
    per = jnp.sum(xlogy(q, q) - q * jax.nn.log_softmax(s, axis=-1), axis=-1)
    return temperature ** 2 * batch_mean(per, batch)


@register("class_relation", taps=LOGITS)
def class_relation(student, teacher, batch, *, temperature=4.0):
    """Class-relation KD for novel class discovery (Gu et al., ICCV 2023, arXiv:2307.09158).

    `teacher` [B, K]: the known-class model's logits; `student` [B, C >= K]: the
    discovery model's logits with its known-class head in the first K columns. The
    class-relation representation of a sample is its distribution over known classes.
    With T the KD temperature:
      p^t = softmax(t / T),  p^s = softmax(s[:, :K] / T)
      w_b = sum_{c < K} softmax(s_b / T)_c,   w <- w / mean_valid(w)   (not detached)
      loss = T^2 * mean_b w_b * KL(p^t_b || p^s_b)
    Our reading of the paper and its code (github.com/kleinzcy/Cr-KD-NCD,
    `model/losses.py:KD`): the learnable weight is the student's probability mass on
    the known classes, so a novel sample semantically close to known classes gets more
    distillation. The code uses the cross-entropy -sum p^t log p^s where we use KL (the
    paper's formula); they differ by w_b * T^2 * H(p^t_b), which also changes the weight's
    gradient. The code divides cosine logits by 0.1 before T: pass such logits
    pre-scaled. Use `batch['mask']` to select the novel-class (unlabelled) samples.
    """
    t = f32(teacher) / temperature
    s_all = f32(student) / temperature
    k = t.shape[-1]
    if s_all.shape[-1] < k:
        raise errors.ConfigError(f"loss 'class_relation': student has {s_all.shape[-1]} classes, fewer than "
                                 f"the teacher's {k} known classes")
    weight = jnp.sum(jax.nn.softmax(s_all, axis=-1)[:, :k], axis=-1)
    weight = weight / batch_mean(weight, batch)
    return temperature ** 2 * batch_mean(weight * kl_rows(t, s_all[:, :k]), batch)


def class_mean_rows(values, labels, weights):
    """[B, D]: for each sample, the weighted mean of `values` over the samples sharing its label."""
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32) * weights[None, :]
    sums = jnp.matmul(same, values, precision="highest")  # float32 on GPU/TPU too (registry.float32_matmuls)
    return sums / jnp.maximum(jnp.sum(same, axis=-1, keepdims=True), 1e-12)


def trilateral_features(student_logits, teacher_logits, labels, *, temperature=1.0, mask=None,
                        class_mean_probs=None):
    """[B, 7C + 7] inputs of the fusion-ratio MLP (`connectors.FusionRatioMLP`), arXiv:2312.15112.

    Vertices per sample: S = softmax(s / T), T = softmax(t / T), G = one_hot(y), and the
    teacher's class-average prediction Tbar_y (inter-sample relation). Features: the
    vertices, the edge vectors S-T, T-G, S-G, T-Tbar, the four edge lengths, and the
    cosines of the triangle's angles at S, T and G. `class_mean_probs` [K, C] (over the
    training set) when given, else Tbar is the mean of T over same-label samples in
    the batch. Everything here is under stop_gradient: the ratio is a weight.
    """
    s = jax.nn.softmax(f32(student_logits) / temperature, axis=-1)
    t = jax.nn.softmax(f32(teacher_logits) / temperature, axis=-1)
    g = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.float32)
    w = jnp.ones((s.shape[0],), jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
    t_bar = class_mean_rows(t, labels, w) if class_mean_probs is None else jnp.asarray(class_mean_probs)[labels]
    st, tg, sg, tb = s - t, t - g, s - g, t - t_bar

    def length(v):
        return jnp.sqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)

    def cos(u, v):
        return jnp.sum(u * v, -1, keepdims=True) / (length(u) * length(v))

    angles = [cos(-st, -sg), cos(st, -tg), cos(sg, tg)]  # at S, at T, at G
    feats = [s, t, g, st, tg, sg, tb, length(st), length(tg), length(sg), length(tb)] + angles
    return jax.lax.stop_gradient(jnp.concatenate(feats, axis=-1))


@register("trilateral", taps=LOGITS, reads_label=True)
def trilateral(student, teacher, batch, *, temperature=4.0):
    """Adaptive per-sample KD / CE fusion (TGeo-KD, "Less or More From Teacher:
    Exploiting Trilateral Geometry For Knowledge Distillation", arXiv:2312.15112).

    With the per-sample fusion ratio a_b = batch['fusion_ratio'] in [0, 1]:
      loss = mean_b [ a_b * T^2 * KL(softmax(t_b / T) || softmax(s_b / T))
                      + (1 - a_b) * CE(s_b, y_b) ]
    This term already holds the CE, so set the task's `ce_weight` to 0 with it.
    The caller computes a_b = FusionRatioMLP(trilateral_features(s, t, y)) and
    trains that network (the paper's bilevel optimisation: the KD task's
    `_trilateral_term`); here the ratio is an input.
    """
    if batch is None or "fusion_ratio" not in batch:
        raise errors.ConfigError("loss 'trilateral' needs batch['fusion_ratio'] [B] from "
                                 "connectors.FusionRatioMLP; the batch has none")
    y = labels_of(batch, "trilateral")
    ratio = f32(batch["fusion_ratio"]).reshape(y.shape[0])
    s, t = f32(student), f32(teacher)
    kd_b = temperature ** 2 * kl_rows(t / temperature, s / temperature)
    return batch_mean(ratio * kd_b + (1.0 - ratio) * cross_entropy_rows(s, y), batch)
