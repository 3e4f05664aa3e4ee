"""Deep mutual learning: several students trained together in one jitted step
(Zhang et al., arXiv:1706.00384).

Student k minimizes `CE(p_k, y) + kl_weight * T^2 * mean_{j != k} KL(p_j^T || p_k^T)`
with the peers' predictions under stop_gradient, so one gradient of the summed
loss gives every student its own DML update (the simultaneous variant). The
students are `model` plus `dml.peers` (model sections; default: copies of
`model`). Evaluation reports student 0 (`accuracy`), each student and the
ensemble of their averaged probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transferlab import losses
from transferlab.config import model_section
from transferlab.errors import ConfigError
from transferlab.tasks import common


class DMLTask:
    """Params: {'model': student 0, 'peer1': ..., ...}; model state likewise."""

    def __init__(self, config, num_classes: int, num_train_examples: int = 0):
        self.config = config
        self.num_classes = num_classes
        sections = [config.model] + [_peer_section(p, i, config.model) for i, p in enumerate(config.dml.peers)]
        while len(sections) < config.dml.num_students:
            sections.append(config.model)
        self.names = ["model"] + [f"peer{i}" for i in range(1, len(sections))]
        self.models = [common.build_model(s, num_classes) for s in sections]  # >= 2: config.validate

    def init_params(self, rng, images):
        params, state = {}, {}
        for i, (name, model) in enumerate(zip(self.names, self.models)):
            params[name], state[name] = common.init_model(model, jax.random.fold_in(rng, i), images)
        return params, state

    def load_frozen(self, mesh, abstract_images):
        return {}

    def abstract_frozen(self, abstract_images):
        return {}

    def loss_fn(self, params, model_state, frozen, batch, rng, step):
        del frozen, rng, step
        outs = [common.forward(m, params[n], model_state[n], batch["image"], train=True)
                for n, m in zip(self.names, self.models)]
        logits = [o[0] for o in outs]
        targets = common.targets(batch, self.num_classes)
        temperature, total, metrics = self.config.dml.temperature, 0.0, {}
        kd = losses.get("kd").fn
        for k, name in enumerate(self.names):
            ce = common.cross_entropy(logits[k], targets)
            peers = [jax.lax.stop_gradient(logits[j]) for j in range(len(logits)) if j != k]
            mimic = sum(kd(logits[k], p, batch, temperature=temperature) for p in peers) / len(peers)
            total = total + ce + self.config.dml.kl_weight * mimic
            metrics[f"loss/{name}_ce"] = ce
            metrics[f"loss/{name}_mimic"] = mimic
        metrics["loss/ce"] = metrics["loss/model_ce"]
        metrics["loss/total"] = total
        metrics["accuracy"] = common.train_accuracy(logits[0], batch["label"], batch.get("label_soft"))
        new_state = {n: o[1] for n, o in zip(self.names, outs)}
        return total, (new_state, metrics)

    def eval_fn(self, params, model_state, frozen, batch):
        logits = [common.forward(m, params[n], model_state[n], batch["image"], train=False)[0]
                  for n, m in zip(self.names, self.models)]
        sums = common.classification_sums(logits[0], batch["label"], batch["mask"])
        for name, x in zip(self.names[1:], logits[1:]):
            sums[f"{name}_accuracy"] = common.classification_sums(x, batch["label"], batch["mask"])["accuracy"]
        mean_probs = jnp.mean(jnp.stack([jax.nn.softmax(x.astype(jnp.float32)) for x in logits]), axis=0)
        sums["ensemble_accuracy"] = common.classification_sums(jnp.log(mean_probs + 1e-12), batch["label"],
                                                               batch["mask"])["accuracy"]
        return sums


def _peer_section(raw, index, default):
    raw = dict(raw)
    unknown = set(raw) - {"name", "dtype", "kwargs"}
    if unknown:
        raise ConfigError(f"dml.peers[{index}]: unknown keys {sorted(unknown)}; expected name, dtype, kwargs")
    section = model_section(raw.get("name", default.name))
    section.dtype = raw.get("dtype", default.dtype)
    section.kwargs = dict(raw.get("kwargs", default.kwargs if "name" not in raw else {}))
    return section
