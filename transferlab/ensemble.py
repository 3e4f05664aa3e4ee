"""Ensembles of finished runs: average the members' softmax probabilities on a split.

Used for the ensemble of born-again generations (Furlanello et al., arXiv:1805.04770)
and any study's `study.ensembles`. Each member is restored at the step its run
selected (results.json), so the ensemble never looks at the test split to choose.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from transferlab import checkpoint, data, files, parallel, provenance
from transferlab.tasks import common
from transferlab.tasks.kd import selected_step
from transferlab.train import Trainer


def _member_predictor(config, run_dir: str, mesh_devices=None):
    trainer = Trainer(config, run_dir, devices=mesh_devices)
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    try:
        step = selected_step(run_dir, ckpt)
        abstract = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    model = trainer.task.model if hasattr(trainer.task, "model") else trainer.task.models[0]

    @jax.jit
    def probs(state, images):
        logits = common.forward(model, state["params"]["model"], state["model_state"]["model"], images,
                                train=False)[0]
        return jax.nn.softmax(logits.astype(jnp.float32))

    return trainer, state, probs


def evaluate_ensemble(members, out_dir: str) -> dict:
    """`members`: [(config, run_dir)]. Writes `out_dir/results.json` (validation and test) and returns it."""
    start = time.time()
    predictors = [_member_predictor(c, d) for c, d in members]
    first = predictors[0][0]
    config = first.config
    results = {"task": "ensemble", "model": "+".join(c.model.name for c, _ in members),
               "dataset": config.dataset.name, "seed": config.seed, "total_steps": config.total_steps,
               "selection": "each member's own rule", "members": [os.path.abspath(d) for _, d in members]}
    results["test"] = {}  # (stays empty with no test split)
    for name, split in (("validation", config.dataset.eval_split), ("test", config.dataset.test_split)):
        if not split:
            continue
        correct = count = 0.0
        for local in data.eval_batches(config.dataset.name, split, first.eval_batch_size,
                                       data_dir=first.data_dir, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
            batch = parallel.global_batch(first.mesh, local)
            mean = sum(p(s, batch["image"]) for _, s, p in predictors) / len(predictors)
            sums = common.classification_sums(jnp.log(mean + 1e-12), batch["label"], batch["mask"])
            correct += float(sums["accuracy"])
            count += float(sums["count"])
        results[name] = {"accuracy": correct / count, "count": int(count)}
    results["wall_time_s"] = round(time.time() - start, 2)
    results["selected_step"] = None
    results["environment"] = provenance.environment()
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        files.write_json(os.path.join(out_dir, "results.json"), results)
    return results
