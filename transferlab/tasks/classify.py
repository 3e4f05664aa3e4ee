"""Plain supervised classification: trains teachers and from-scratch baselines."""

from __future__ import annotations

from transferlab.tasks import common


class ClassifyTask:
    """Cross-entropy on (possibly mixed) labels. Params: {'model': ...}; model state: {'model': ...}."""

    def __init__(self, config, num_classes: int, num_train_examples: int = 0):
        self.config = config
        self.num_classes = num_classes
        self.model = common.build_model(config.model, num_classes)

    def init_params(self, rng, images):
        params, model_state = common.init_model(self.model, rng, images)
        return {"model": params}, {"model": model_state}

    def load_frozen(self, mesh, abstract_images):
        return {}

    def abstract_frozen(self, abstract_images):
        return {}

    def loss_fn(self, params, model_state, frozen, batch, rng, step):
        del frozen, rng, step
        logits, new_state, _ = common.forward(self.model, params["model"], model_state["model"],
                                              batch["image"], train=True)
        loss = common.cross_entropy(logits, common.targets(batch, self.num_classes))
        accuracy = common.train_accuracy(logits, batch["label"], batch.get("label_soft"))
        metrics = {"loss/ce": loss, "accuracy": accuracy}
        return loss, ({"model": new_state}, metrics)

    def eval_fn(self, params, model_state, frozen, batch):
        del frozen
        logits, _, _ = common.forward(self.model, params["model"], model_state["model"], batch["image"], train=False)
        return common.classification_sums(logits, batch["label"], batch["mask"])
