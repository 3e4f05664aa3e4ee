"""Studies: several arms (teacher, baseline student, KD student, ...) x seeds, run in order.

A config with `study.arms` runs each arm for each seed in `DIR/<arm>/seed_<s>`,
a complete run with its own config.json, checkpoints and results.json. Arm
overrides are dotted keys (`'model.name': 'mlp'`); the string `{workdir}` in a
value becomes the study's workdir, so a KD arm can point `teacher.checkpoint` at
`{workdir}/teacher/seed_0`. Every arm's config is resolved and validated before
any training. Finished runs (results.json present) are skipped, so rerunning
the command resumes a killed study. The table goes to DIR/results.{json,md}.
"""

from __future__ import annotations

import copy
import os

from transferlab import config as config_lib, report


def resolve_arms(config, workdir: str) -> list[tuple[str, int, object]]:
    """[(arm name, seed, validated config)] in execution order."""
    workdir = os.path.abspath(workdir)
    runs = []
    for i, arm in enumerate(config.study.arms):
        base = copy.deepcopy(config)
        base.study.arms, base.study.seeds = (), ()
        for key, value in dict(arm.get("overrides", {})).items():
            if isinstance(value, str):
                value = value.replace("{workdir}", workdir)
            config_lib.apply_override(base, key, value)
        seeds = tuple(arm.get("seeds", ())) or tuple(config.study.seeds) or (config.seed,)
        for seed in seeds:
            run = copy.deepcopy(base)
            run.seed = int(seed)
            try:
                config_lib.validate(run)
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"study.arms[{i}] ({arm['name']}): {e}") from None
            runs.append((arm["name"], int(seed), run))
    return runs


def run_study(config, workdir: str, train_fn) -> dict:
    """Runs every (arm, seed) not yet finished, then writes and returns the results table."""
    runs = resolve_arms(config, workdir)
    for arm, seed, run_config in runs:
        run_dir = os.path.join(workdir, arm, f"seed_{seed}")
        if os.path.exists(os.path.join(run_dir, "results.json")):
            print(f"[study] {arm} seed {seed}: already finished, skipped", flush=True)
            continue
        print(f"[study] {arm} seed {seed}: training in {run_dir}", flush=True)
        out = train_fn(run_config, run_dir)
        if "preempted_at_step" in out:
            return out
    return report.write_study_report(workdir, [arm for arm, _, _ in runs])
