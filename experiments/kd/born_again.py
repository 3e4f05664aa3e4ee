"""Born-again networks (Furlanello et al., arXiv:1805.04770) on MNIST-5k: a chain of generations.

Generation 0 is trained from labels; generation k is the same architecture
distilled from generation k-1 of the same seed (`teacher.name` left empty:
the teacher has the student's architecture) (KD, or the paper's CWTM / DKPP
objectives with `loss=cwtm|dkpp`); the table adds the ensemble of generations
1..K (averaged probabilities). Each run selects its last step. Run:

  python -m transferlab.main --config experiments/kd/born_again.py --workdir runs/ban
  python -m transferlab.main --config experiments/kd/born_again.py:generations=2,seeds=1,steps=100 --workdir runs/ban_short
"""

import ml_collections

from transferlab.config import int_arg, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, allowed=("steps", "generations", "loss", "seeds"))
    steps = int_arg(args, "steps", 600)
    generations = int_arg(args, "generations", 3)
    loss = args.get("loss", "kd")
    c = ml_collections.ConfigDict()
    c.total_steps = steps
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every_steps = 100
    c.eval_every_steps = steps
    c.checkpoint_every_steps = steps
    c.dataset = {"name": "mnist5k"}
    c.augment = {"crop_padding": 2}
    c.model = {"name": "lenet5"}
    c.optimizer = {"name": "sgd", "learning_rate": 0.05}
    c.schedule = {"name": "cosine", "warmup_steps": steps // 20}
    terms = ({"name": loss, "weight": 1.0},)
    arms = [{"name": "gen0", "overrides": {"task": "classify"}}]
    for k in range(1, generations + 1):
        arms.append({"name": f"gen{k}", "overrides": {
            "task": "kd", "teacher.checkpoint": f"{{workdir}}/gen{k - 1}/seed_{{seed}}",
            "distill.ce_weight": 1.0 if loss == "kd" else 0.0, "distill.terms": terms}})
    seeds = int_arg(args, "seeds", 3)
    c.study = {"seeds": tuple(range(seeds)), "arms": tuple(arms),
               "ensembles": ({"name": "ensemble", "arms": tuple(f"gen{k}" for k in range(1, generations + 1))},),
               "title": f"Born-again networks on MNIST-5k: LeNet-5, {generations} generation(s), {seeds} seed(s)",
               "description": (
                   "Furlanello et al., arXiv:1805.04770: generation 0 is a LeNet-5 trained from labels; generation "
                   f"k is the same architecture trained from generation k-1 of the same seed ({loss}"
                   f"{' + label CE' if loss == 'kd' else ', no label CE'}); `ensemble` averages the probabilities "
                   f"of generations 1-{generations}. SGD lr 0.05, cosine with 5% warm-up, {steps} steps, batch 64, "
                   "pad-2 crops. **Selection rule: the last step.** The test split is evaluated once per run and "
                   f"never used for selection. Each cell is mean ± sample std over {seeds} seed(s).")}
    return c
