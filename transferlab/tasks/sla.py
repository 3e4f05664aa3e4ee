"""Self-supervised label augmentation with self-distillation, SLA+SD (Lee, Hwang & Shin,
arXiv:1910.05872).

Every training image is seen under M input transformations t_1..t_M (t_1 = identity):
the four rotations by 0/90/180/270 degrees, the six permutations of the RGB
channels, or all 24 of their combinations (`rotation_color`, the paper's combined
setting: rotation k of colour order p, k-major). A *joint* head on the backbone's features classifies (class, transformation)
pairs, N * M outputs with the joint label of class y under t_j being `y * M + j`. Its
*aggregated* prediction for class c averages the joint logits of (c, t_j) over the M
transformed copies of the image (SLA-AG, the paper's eq. 4). Self-distillation trains the
backbone's ordinary *single* head (the model's own classifier, on the untransformed
image) to match the aggregated prediction, so one forward pass at test time gets most of
the M-pass ensemble's accuracy:

    loss = joint_weight * mean_j CE(joint(t_j(x)), (y, j))
         + single_weight * CE(single(x), y)
         + distill_weight * T^2 * KL(softmax(stop_grad(aggregated) / T) || softmax(single(x) / T))

as the authors' code does it (joint CE averaged over the B * M copies, KL batch-mean, the
aggregated teacher under stop-gradient). The joint head is a student-side trainable
module (params['joint_head']) dropped at export, like the KD connectors: the exported
model is the backbone with its single head. The model's `features` tap (the pooled
penultimate activations every model here sows) feeds the joint head.

Evaluation reports the single head as `accuracy` (the deployable model, what
selection uses), `aggregated_accuracy` (SLA-AG, M forward passes) and `joint_accuracy`
(the joint head on the untransformed image, SLA-SI).
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from transferlab.errors import ConfigError
from transferlab.tasks import common

TRANSFORMS = ("rotation", "color_permutation", "rotation_color")
FEATURES_TAP = "features"


def num_transforms(kind: str) -> int:
    return {"rotation": 4, "color_permutation": 6, "rotation_color": 24}[kind]


def transform_images(images_BxHxWxC, kind: str):
    """The M transformed copies of a batch, transformation-major: [M * B, H, W, C] (copy 0 = identity)."""
    rotations = range(4) if kind in ("rotation", "rotation_color") else (0,)
    orders = itertools.permutations(range(3)) if kind in ("color_permutation", "rotation_color") else [None]
    copies = []
    for k, order in itertools.product(rotations, list(orders)):
        x = images_BxHxWxC if order is None else images_BxHxWxC[..., list(order)]
        copies.append(jnp.rot90(x, k, axes=(1, 2)) if k else x)
    return jnp.concatenate(copies, axis=0)


def joint_targets(soft_BxN, num_copies: int):
    """Joint soft targets per copy j: class c's mass at joint index c * M + j. Returns [M * B, N * M]."""
    b, n = soft_BxN.shape
    eye = jnp.eye(num_copies, dtype=soft_BxN.dtype)  # [M (copy j), M (joint slot)]
    joint = soft_BxN[None, :, :, None] * eye[:, None, None, :]  # [M, B, N, M]
    return joint.reshape(num_copies * b, n * num_copies)


def aggregate(joint_logits_MBxNM, num_copies: int):
    """SLA-AG: per class c, the mean over copies j of the joint logit (c, j) on copy j. Returns [B, N]."""
    mb, nm = joint_logits_MBxNM.shape
    m = num_copies
    per_copy = joint_logits_MBxNM.reshape(m, mb // m, nm // m, m)  # [copy j, B, class c, slot j']
    return jnp.mean(jnp.diagonal(per_copy, axis1=0, axis2=3), axis=-1)  # slot j' == copy j


class SLASelfDistillTask:
    """Params: {'model': backbone + single head, 'joint_head': Dense(N * M)}; model state: {'model': ...}."""

    def __init__(self, config, num_classes: int, num_train_examples: int = 0):
        self.config = config
        self.num_classes = num_classes
        self.kind = config.sla.transform
        if self.kind not in TRANSFORMS:
            raise ConfigError(f"config key 'sla.transform': {self.kind!r} is not one of {', '.join(TRANSFORMS)}")
        self.num_copies = num_transforms(self.kind)
        if not (config.sla.joint_weight or config.sla.single_weight or config.sla.distill_weight):
            raise ConfigError("sla: joint_weight, single_weight and distill_weight are all 0: nothing to train")
        self.model = common.build_model(config.model, num_classes)
        self.joint_head = nn.Dense(num_classes * self.num_copies, name="joint_head")

    def _check_images(self, images):
        _, h, w, c = images.shape
        if self.kind in ("rotation", "rotation_color") and h != w:
            raise ConfigError(f"config key 'sla.transform': {self.kind!r} needs square images, got {h}x{w}")
        if self.kind in ("color_permutation", "rotation_color") and c != 3:
            raise ConfigError(f"config key 'sla.transform': {self.kind!r} needs 3 channels, got {c}")

    def _features(self, params, model_state, images, train):
        logits, new_state, taps = common.forward(self.model, params, model_state, images, train=train, taps=True)
        if FEATURES_TAP not in taps:
            raise ConfigError(f"config key 'model.name': {self.config.model.name!r} sows no {FEATURES_TAP!r} tap "
                              f"for the joint head; available taps: {', '.join(sorted(taps))}")
        return logits, taps[FEATURES_TAP].reshape(images.shape[0], -1), new_state

    def init_params(self, rng, images):
        self._check_images(images)
        params, model_state = common.init_model(self.model, rng, images)
        _, features, _ = self._features(params, model_state, images, train=False)
        head = self.joint_head.init(jax.random.fold_in(rng, 1), features)["params"]
        return {"model": params, "joint_head": head}, {"model": model_state}

    def load_frozen(self, mesh, abstract_images):
        return {}

    def abstract_frozen(self, abstract_images):
        return {}

    def loss_fn(self, params, model_state, frozen, batch, rng, step):
        del frozen, rng, step
        cfg, m = self.config.sla, self.num_copies
        images = batch["image"]
        b = images.shape[0]
        single_all, features, new_state = self._features(params["model"], model_state["model"],
                                                         transform_images(images, self.kind), train=True)
        joint = self.joint_head.apply({"params": params["joint_head"]}, features).astype(jnp.float32)
        single = single_all[:b].astype(jnp.float32)  # copy 0 is the untransformed batch
        targets = common.targets(batch, self.num_classes)
        joint_ce = common.cross_entropy(joint, joint_targets(targets, m))
        single_ce = common.cross_entropy(single, targets)
        aggregated = jax.lax.stop_gradient(aggregate(joint, m))
        t = cfg.temperature
        teacher_probs = jax.nn.softmax(aggregated / t)
        kl = jnp.sum(teacher_probs * (jax.nn.log_softmax(aggregated / t) - jax.nn.log_softmax(single / t)),
                     axis=-1)
        distill = t * t * jnp.mean(kl)
        total = cfg.joint_weight * joint_ce + cfg.single_weight * single_ce + cfg.distill_weight * distill
        metrics = {"loss/ce": single_ce, "loss/joint_ce": joint_ce, "loss/self_distill": distill,
                   "loss/total": total,
                   "accuracy": common.train_accuracy(single, batch["label"], batch.get("label_soft")),
                   "aggregated_accuracy": common.train_accuracy(aggregated, batch["label"], batch.get("label_soft"))}
        return total, ({"model": new_state}, metrics)

    def eval_fn(self, params, model_state, frozen, batch):
        del frozen
        images, m = batch["image"], self.num_copies
        b = images.shape[0]
        single_all, features, _ = self._features(params["model"], model_state["model"],
                                                 transform_images(images, self.kind), train=False)
        joint = self.joint_head.apply({"params": params["joint_head"]}, features).astype(jnp.float32)
        sums = common.classification_sums(single_all[:b], batch["label"], batch["mask"])
        for name, logits in (("aggregated_accuracy", aggregate(joint, m)),
                             ("joint_accuracy", joint[:b].reshape(b, self.num_classes, m)[:, :, 0])):
            sums[name] = common.classification_sums(logits, batch["label"], batch["mask"])["accuracy"]
        return sums
