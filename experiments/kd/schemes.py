"""Every KD scheme on the KD table's setup: MNIST-5k, resnet20 teacher -> resnet8 student, 3 seeds.

The methods table (`experiments/kd/table.py`, results/kd.md) compares loss
terms; this study compares the ways of training with them, on the same data,
models and schedule, with Hinton KD (arXiv:1503.02531, the `kd` preset: CE 0.1,
KD 0.9, T=4) as the loss wherever a scheme needs one. Its `teacher`, `student`
and `student+kd` arms are the table's own (same configs), so the rows compare
directly with results/kd.md's. Arms:

  student+kd_mixup, student+kd_cutmix   KD on mixup (arXiv:1710.09412) / CutMix
                                         (arXiv:1905.04899) batches, alpha 1 (their CIFAR
                                         setting); teacher and student see the same mixed images
  student+fm                            function matching (Beyer et al., arXiv:2106.05237):
                                         mixup + CutMix views, KD alone at T=1, no labels
  student+hard                          KD on HARD's learned hard augmentations (arXiv:2305.14890):
                                         half of each batch warped by the affine augmentor (defaults)
  student+kd_2teachers_avg              two teachers of different architectures (resnet20 and
  student+kd_2teachers_adaptive         wrn_16_2, arm `teacher2`): averaged, or weighted per sample
                                         by their confidence in the label (CA-MKD, arXiv:2201.00007)
  student+self_ema                      self-distillation from the student's own EMA (mean teacher,
                                         arXiv:1703.01780; decay 0.99, CE 1 + KD 1 at T=4, KD warmed up)
  dml                                   deep mutual learning (arXiv:1706.00384): two resnet8
                                         students in one step, no teacher; the row is student 0
  ban_gen1, ban_gen2, ban_ensemble      born-again networks (arXiv:1805.04770): generation k is a
                                         resnet8 distilled (CE 1 + KD 1) from generation k-1 of the
                                         same seed (generation 0: the `student` arm); the ensemble
                                         averages generations 1-2's probabilities
  student+partition                     data-partition transfer between two pretrained models
                                         ("Fantastic Gains", arXiv:2310.17653): the `student` run,
                                         trained on, distilled (KD alone, T=1) per sample from whichever
                                         of the teacher and its own pretrained self is more confident in
                                         the true label; lr 0.01 (it starts trained)

  student+kd_cached                     KD from a teacher-output cache of 8 replayable crop views per
                                         example (`distill.teacher_cache_views`, as FKD's stored crops,
                                         arXiv:2112.01528): no teacher forward in the step; each step
                                         shows each example one of its 8 crops (the other arms: any of 25)

Selection: the last step; the test split is evaluated once per run.

  python -m transferlab.main --config experiments/kd/schemes.py --workdir runs/kd_schemes
  python -m transferlab.main --config experiments/kd/schemes.py:steps=100,seeds=1 --workdir runs/kd_schemes_short

Arguments: `steps=` (student steps, default 250), `seeds=` (how many, from 0),
`dataset=` (as table.py's).
"""

import os

from transferlab.config import int_arg, load_file, parse_arg

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table.py")
SECOND_TEACHER = "wrn_16_2"


def get_config(arg=None):
    args = parse_arg(arg, allowed=("steps", "seeds", "dataset"))
    steps, seeds = int_arg(args, "steps", 250), int_arg(args, "seeds", 3)
    dataset = args.get("dataset", "mnist5k")
    c = load_file(f"{TABLE}:steps={steps},seeds={seeds},dataset={dataset},methods=kd")
    teacher, student, kd = c.study.arms  # the table's teacher, student and student+kd arms
    kd_arm = dict(kd["overrides"])
    warmup = steps * 20 // 240  # the table's warm-up length (20 of 240 "epochs")
    previous_generation = "{workdir}/%s/seed_{seed}"

    def with_kd(**overrides):
        return {**kd_arm, **overrides}

    second_teacher = {"name": SECOND_TEACHER, "checkpoint": "{workdir}/teacher2/seed_0"}
    born_again = {"task": "kd", "teacher.name": "", "distill.ce_weight": 1.0,
                  "distill.terms": ({"name": "kd", "weight": 1.0, "temperature": 4.0},)}
    arms = [
        teacher,
        {"name": "teacher2", "seeds": (0,), "overrides": {**teacher["overrides"], "model.name": SECOND_TEACHER}},
        student, kd,
        {"name": "student+kd_mixup", "overrides": with_kd(**{"augment.mixup_alpha": 1.0})},
        {"name": "student+kd_cutmix", "overrides": with_kd(**{"augment.cutmix_alpha": 1.0})},
        {"name": "student+fm", "overrides": with_kd(**{
            "augment.mixup_alpha": 1.0, "augment.cutmix_alpha": 1.0, "distill.ce_weight": 0.0,
            "distill.terms": ({"name": "kd", "weight": 1.0, "temperature": 1.0},)})},
        {"name": "student+hard", "overrides": with_kd(**{"distill.hard_augment.enabled": True})},
        {"name": "student+kd_cached", "overrides": with_kd(**{
            "distill.teacher_cache": True, "distill.teacher_cache_views": 8})},
        {"name": "student+kd_2teachers_avg", "overrides": with_kd(extra_teachers=(second_teacher,))},
        {"name": "student+kd_2teachers_adaptive", "overrides": with_kd(**{
            "extra_teachers": (second_teacher,), "distill.teacher_combination": "adaptive"})},
        {"name": "student+self_ema", "overrides": {
            "task": "kd", "teacher.checkpoint": "self_ema", "distill.ema_decay": 0.99, "distill.ce_weight": 1.0,
            "distill.terms": ({"name": "kd", "weight": 1.0, "temperature": 4.0, "warmup_steps": warmup},)}},
        {"name": "dml", "overrides": {"task": "dml", "dml.num_students": 2}},
        {"name": "ban_gen1", "overrides": {**born_again, "teacher.checkpoint": previous_generation % "student"}},
        {"name": "ban_gen2", "overrides": {**born_again, "teacher.checkpoint": previous_generation % "ban_gen1"}},
        {"name": "student+partition", "overrides": {
            "task": "kd", "init_checkpoint": previous_generation % "student", "optimizer.learning_rate": 0.01,
            "teacher.name": kd_arm["teacher.name"], "teacher.checkpoint": kd_arm["teacher.checkpoint"],
            "extra_teachers": ({"name": c.model.name, "checkpoint": previous_generation % "student"},),
            "distill.teacher_combination": "partition", "distill.ce_weight": 0.0,
            "distill.terms": ({"name": "kd", "weight": 1.0, "temperature": 1.0},)}},
    ]
    c.study.arms = tuple(arms)
    c.study.ensembles = ({"name": "ban_ensemble", "arms": ("ban_gen1", "ban_gen2")},)
    c.study.title = (f"KD schemes on {dataset}: {kd_arm['teacher.name']} teacher → {c.model.name} student, "
                     f"{seeds} seed(s)")
    c.study.description = (
        f"Setup: as results/kd.md's (`experiments/kd/table.py`, {steps} student steps, teacher(s) "
        f"{2 * steps} steps, seed 0); the second teacher of the multi-teacher rows is a {SECOND_TEACHER}. "
        "Each scheme's recipe is in the `experiments/kd/schemes.py` docstring; KD is the `kd` preset (CE 0.1, "
        "KD 0.9, T=4) unless it says otherwise. `dml` reports student 0 of two; `ban_ensemble` averages the "
        "probabilities of born-again generations 1-2 of each seed; `student+partition` starts from the "
        "`student` run of its seed; `student+kd_cached` reads the teacher's logits on 8 cached crops of each example. **Selection rule: the last step.** The test split is evaluated once per "
        f"run and never used for selection. Each cell is mean ± sample std over {seeds} seed(s) (the teachers: 1).")
    return c
