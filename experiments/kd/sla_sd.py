"""Self-distillation without a teacher: SLA+SD (Lee, Hwang & Shin, arXiv:1910.05872) vs the same
student trained plainly, 3 seeds.

SLA+SD trains a joint (class, transformation) head on M transformed copies of every
image and distils its aggregated prediction into the model's own head (`task='sla_sd'`,
see `transferlab/tasks/sla.py`). Both arms share the recipe of `experiments/kd/table.py`
(SGD lr 0.05, momentum 0.9, wd 5e-4, lr x0.1 at 150/180/210 of 240 "epochs", batch 64,
pad-2 crops) on a bundled real data set. Selection: the last step; the results table
reports the single head (`accuracy`), and each run's results.json also has the
4-pass aggregated (`aggregated_accuracy`) and joint-head (`joint_accuracy`) figures.

  python -m transferlab.main --config experiments/kd/sla_sd.py --workdir runs/sla_sd
  python -m transferlab.main --config experiments/kd/sla_sd.py:dataset=digits,model=resnet20,steps=400 --workdir runs/sla_digits

Arguments: `dataset=` (mnist5k), `model=` (resnet8), `steps=` (250), `seeds=` (3),
`transform=` (rotation; color_permutation or rotation_color, all 24 combinations, for RGB data), `temperature=` (1.0).
"""

import ml_collections

from transferlab.config import int_arg, parse_arg
from transferlab.errors import ConfigError

ARGS = ("dataset", "model", "steps", "seeds", "transform", "temperature")


def get_config(arg=None):
    args = parse_arg(arg)
    if set(args) - set(ARGS):
        raise ConfigError(f"config argument {sorted(set(args) - set(ARGS))[0]!r}: expected {', '.join(ARGS)}")
    steps = int_arg(args, "steps", 250)
    c = ml_collections.ConfigDict()
    c.total_steps = steps
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every_steps = max(steps // 4, 1)
    c.eval_every_steps = 0
    c.checkpoint_every_steps = steps
    c.selection = "last"
    c.dataset = {"name": args.get("dataset", "mnist5k")}
    c.augment = {"crop_padding": 2}
    c.model = {"name": args.get("model", "resnet8")}
    c.optimizer = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                   "decay_norms_and_biases": True}
    c.schedule = {"name": "step", "boundaries": (150 / 240, 180 / 240, 210 / 240), "decay_factor": 0.1}
    c.sla = {"transform": args.get("transform", "rotation"), "temperature": float(args.get("temperature", 1.0))}
    c.study = {"seeds": tuple(range(int_arg(args, "seeds", 3))),
               "arms": ({"name": "student", "overrides": {"task": "classify"}},
                        {"name": "student+sla_sd", "overrides": {"task": "sla_sd"}})}
    return c
