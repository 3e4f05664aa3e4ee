"""KD as function matching (Beyer et al., arXiv:2106.05237) on MNIST-5k, with mixup / cutmix KD.

The teacher and the student see the same aggressively augmented view (the
augmentation runs once, before both forwards, in the jitted step), the loss is
KD alone (ce_weight 0, T=1) and training is long ("consistent and patient").
`aug=mixup|cutmix|both|none` picks the batch mixing; the student arm without KD
uses the same augmentation with soft-label cross-entropy. Selection: last step.

  python -m transferlab.main --config experiments/kd/function_matching.py --workdir runs/fm
  python -m transferlab.main --config experiments/kd/function_matching.py:aug=cutmix,steps=200,seeds=1 --workdir runs/fm_short
"""

import ml_collections

from transferlab.config import int_arg, parse_arg
from transferlab.errors import ConfigError

MIXING = {"mixup": (1.0, 0.0), "cutmix": (0.0, 1.0), "both": (1.0, 1.0), "none": (0.0, 0.0)}


def get_config(arg=None):
    args = parse_arg(arg, allowed=("steps", "aug", "seeds"))
    steps = int_arg(args, "steps", 1500)
    if args.get("aug", "both") not in MIXING:
        raise ConfigError(f"config argument aug={args['aug']!r}: expected one of {', '.join(MIXING)}")
    mixup, cutmix = MIXING[args.get("aug", "both")]
    c = ml_collections.ConfigDict()
    c.total_steps = steps
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every_steps = 100
    c.eval_every_steps = steps
    c.checkpoint_every_steps = steps
    c.dataset = {"name": "mnist5k"}
    c.augment = {"crop_padding": 2, "mixup_alpha": mixup, "cutmix_alpha": cutmix}
    c.model = {"name": "mlp", "kwargs": {"hidden_sizes": (64,)}}
    c.optimizer = {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4}
    c.schedule = {"name": "cosine", "warmup_steps": steps // 20}
    teacher = {"task": "classify", "model.name": "lenet5", "model.kwargs": {}, "augment.mixup_alpha": 0.0,
               "augment.cutmix_alpha": 0.0}
    kd = {"task": "kd", "teacher.name": "lenet5", "teacher.checkpoint": "{workdir}/teacher/seed_0",
          "distill.ce_weight": 0.0, "distill.terms": ({"name": "kd", "weight": 1.0, "temperature": 1.0},)}
    seeds = int_arg(args, "seeds", 3)
    aug = args.get("aug", "both")
    c.study = {"seeds": tuple(range(seeds)), "arms": (
        {"name": "teacher", "overrides": teacher, "seeds": (0,)},
        {"name": "student", "overrides": {"task": "classify"}},
        {"name": "student+fm", "overrides": kd},
    ), "title": f"Function matching on MNIST-5k: LeNet-5 teacher → MLP-64 student, {steps} steps, {seeds} seed(s)",
        "description": (
            f"Beyer et al., arXiv:2106.05237: the teacher and the student see the same mixed view ({aug}: "
            f"mixup alpha {mixup:g}, CutMix alpha {cutmix:g}, on pad-2 crops), the student learns from the "
            "teacher alone (KD at T=1, no label CE), for long. The `student` arm trains on the same mixed "
            "views with the mixed labels; the teacher (seed 0) trains on un-mixed crops. AdamW lr 3e-3, wd 1e-4, "
            "cosine with 5% warm-up, batch 64. **Selection rule: the last step.** The test split is evaluated "
            f"once per run and never used for selection. Each cell is mean ± sample std over {seeds} seed(s) "
            "(the teacher: 1).")}
    return c
