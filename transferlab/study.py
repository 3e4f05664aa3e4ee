"""Studies: several arms (teacher, baseline student, KD student, ...) x seeds, run in order.

A config with `study.arms` runs each arm for each seed in `DIR/<arm>/seed_<s>`,
a complete run with its own config.json, checkpoints and results.json. Arm
overrides are dotted keys (`'model.name': 'mlp'`); the strings `{workdir}` and
`{seed}` in a value (nested ones too, e.g. in `extra_teachers`) become the
study's workdir and the run's seed, so a KD arm can point `teacher.checkpoint`
at `{workdir}/teacher/seed_0` or `{workdir}/teacher/seed_{seed}`. Every arm's
config is resolved and validated before any training, and (with `check_fn`, as
the CLI does) each unfinished arm's models, taps and connectors are built
abstractly and one train step is traced (no compute), so a wrong tap name or a
loss given taps of the wrong kind in the last arm fails in seconds, not after the
teacher has trained; so does a checkpoint input (teacher, init) that neither
exists nor is written by an earlier run. Finished runs (results.json present)
are skipped if their config.json matches the run the study would train (else a
ConfigError before anything trains), so rerunning the command resumes a killed
study. A stop signal (`preemption`) between runs starts no further run. The
table goes to DIR/results.{json,md}.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from transferlab import checkpoint, config as config_lib, preemption, report
from transferlab.errors import UserError


def _substitute(value, workdir: str, seed: int):
    """`{workdir}` and `{seed}` in a string, and in every string nested in lists, tuples and dicts
    (`extra_teachers`' checkpoints, `dml.peers`, ...)."""
    if isinstance(value, str):
        return value.replace("{workdir}", workdir).replace("{seed}", str(seed))
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, workdir, seed) for v in value)
    if isinstance(value, ml_collections.ConfigDict):
        return ml_collections.ConfigDict({k: _substitute(v, workdir, seed) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _substitute(v, workdir, seed) for k, v in value.items()}
    return value


def resolve_arms(config, workdir: str) -> list[tuple[str, int, object]]:
    """[(arm name, seed, validated config)] in execution order."""
    workdir = os.path.abspath(workdir)
    runs = []
    for i, arm in enumerate(config.study.arms):
        seeds = tuple(arm.get("seeds", ())) or tuple(config.study.seeds) or (config.seed,)
        for seed in seeds:
            run = copy.deepcopy(config)
            run.study.arms, run.study.seeds, run.study.ensembles = (), (), ()
            try:
                for key, value in dict(arm.get("overrides", {})).items():
                    config_lib.apply_override(run, key, _substitute(value, workdir, seed), parse_strings=False)
                run.seed = int(seed)
                config_lib.validate(run)
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"study.arms[{i}] ({arm['name']}): {e}") from None
            runs.append((arm["name"], int(seed), run))
    return runs  # (study.ensembles: checked by config.validate)


def _ensemble_members(ens, runs, workdir: str) -> dict:
    """{seed: [(member config, member run dir)]} of ensemble `ens`."""
    by_seed = {}
    for arm, seed, run_config in runs:
        if arm in ens["arms"]:
            by_seed.setdefault(seed, []).append((run_config, os.path.join(workdir, arm, f"seed_{seed}")))
    return by_seed


def _arm_of(run_dir) -> str:
    """'DIR/arm/seed_0' -> 'arm'."""
    return os.path.basename(os.path.dirname(os.path.normpath(str(run_dir))))


def _check_finished_ensembles(config, runs, workdir: str) -> None:
    """An ensemble evaluated earlier is reused only if it had the members this study gives it."""
    for i, ens in enumerate(config.study.ensembles):
        for seed, members in _ensemble_members(ens, runs, workdir).items():
            path = os.path.join(workdir, ens["name"], f"seed_{seed}", "results.json")
            if not os.path.exists(path):
                continue
            saved = report.read_json(path).get("members")
            saved_arms = [_arm_of(d) for d in saved] if isinstance(saved, list) else []
            if saved_arms != [_arm_of(d) for _, d in members]:
                raise config_lib.ConfigError(
                    f"study.ensembles[{i}] ({ens['name']}) seed {seed}: {os.path.dirname(path)} was evaluated with "
                    f"other members ({', '.join(saved_arms) or 'unknown'}); use a new --workdir, or move it away to "
                    "evaluate it again")


ENSEMBLE_SHARED_KEYS = ("dataset.name", "dataset.data_dir", "dataset.eval_split", "dataset.test_split")


def check_ensembles(config, runs) -> None:
    """An ensemble averages its arms' predictions per seed on one dataset's splits: its arms must run the same
    seeds (a seed with one member would be a single model in the row) and read the same dataset and splits."""
    seeds = {}
    for arm, seed, run_config in runs:
        seeds.setdefault(arm, []).append((seed, run_config))
    for i, ens in enumerate(config.study.ensembles):
        first = ens["arms"][0]
        for arm in ens["arms"][1:]:
            if sorted(s for s, _ in seeds[arm]) != sorted(s for s, _ in seeds[first]):
                raise config_lib.ConfigError(
                    f"study.ensembles[{i}] ({ens['name']}): arms {first!r} and {arm!r} run different seeds "
                    f"({[s for s, _ in seeds[first]]} and {[s for s, _ in seeds[arm]]}); an ensemble's arms must "
                    "run the same seeds")
            for key in ENSEMBLE_SHARED_KEYS:
                a, b = (config_lib.value_at(seeds[name][0][1], key) for name in (first, arm))
                if a != b:
                    raise config_lib.ConfigError(
                        f"study.ensembles[{i}] ({ens['name']}): arms {first!r} and {arm!r} have different {key} "
                        f"({a!r} and {b!r}); an ensemble's arms are evaluated on one dataset's splits")


def _checkpoint_inputs(run_config):
    """(config key, workdir) of every other run this run reads weights from."""
    pairs = [("teacher.checkpoint", run_config.teacher.checkpoint), ("init_checkpoint", run_config.init_checkpoint)]
    pairs += [(f"extra_teachers[{i}].checkpoint", dict(t).get("checkpoint", ""))
              for i, t in enumerate(run_config.extra_teachers)]
    from transferlab.tasks.kd import RANDOM_TEACHER, SELF_EMA
    return [(key, path) for key, path in pairs if path and path not in (RANDOM_TEACHER, SELF_EMA)]


def check_run_inputs(config, runs, workdir: str) -> None:
    """Every checkpoint a run reads (teacher, init, extra teachers) must exist already or be written by an
    earlier run of the study: a mistyped `{workdir}/teachr/...` or a `{seed}` with no such teacher seed
    fails before anything trains, not after the first arms have."""
    index = {arm["name"]: i for i, arm in enumerate(config.study.arms)}
    earlier = set()
    for arm, seed, run_config in runs:
        for key, path in _checkpoint_inputs(run_config):
            path = os.path.abspath(path)
            if path not in earlier and not os.path.isdir(os.path.join(path, "checkpoints")):
                raise config_lib.ConfigError(
                    f"study.arms[{index[arm]}] ({arm}) seed {seed}: {key} {path!r} is neither a trained run nor "
                    f"one an earlier arm writes ({', '.join(sorted(os.path.relpath(p, workdir) for p in earlier)) or 'none'})")
        earlier.add(os.path.abspath(os.path.join(workdir, arm, f"seed_{seed}")))


def check_arms(config, runs, workdir: str, check_fn) -> None:
    """`check_fn(run_config)` once per arm with an unfinished run (its first such seed); a ConfigError
    names the arm."""
    index = {arm["name"]: i for i, arm in enumerate(config.study.arms)}
    checked = set()
    for arm, seed, run_config in runs:
        if arm in checked or os.path.exists(os.path.join(workdir, arm, f"seed_{seed}", "results.json")):
            continue
        checked.add(arm)
        try:
            check_fn(run_config)
        except UserError as e:  # (a config key, or a checkpoint that does not match the arm's model)
            raise config_lib.ConfigError(f"study.arms[{index[arm]}] ({arm}): {e}") from None


_RETRAIN = "use a new --workdir, or move that run away to retrain it"


def _copied_from(run_dir: str) -> str:
    """For a run of a study copied elsewhere while the original is still in place: why its teacher paths
    differ, and what to do (a copy's teachers at the old paths are other runs, so it is not resumed as is)."""
    saved = checkpoint.saved_config(run_dir) or {}
    was = saved.get("_run_dir")
    if not isinstance(was, str) or os.path.abspath(was) == os.path.abspath(run_dir) or not os.path.isdir(was):
        return ""
    return (f"this run is a copy of {was}, which is still there: the copy would now distil from its own "
            "copies of the teachers, not the runs it was trained with; move (or rename) the original study "
            "away and rerun to continue the copy, or use a new --workdir")


def run_study(config, workdir: str, train_fn, check_fn=None, command: str = "") -> dict:
    """Runs every (arm, seed) not yet finished, then the ensembles, and writes the results table.

    `check_fn(run_config)`, if given, is called for each arm before anything trains (see check_arms).
    `command`, if given, is the command line that ran the study; the report names it.
    """
    runs = resolve_arms(config, workdir)
    for arm, seed, run_config in runs:  # a finished run is reused only if this study would train the same one
        run_dir = os.path.join(workdir, arm, f"seed_{seed}")
        changed = (checkpoint.config_difference(run_dir, run_config)
                   if os.path.exists(os.path.join(run_dir, "results.json")) else None)
        if changed:
            raise config_lib.ConfigError(f"{arm} seed {seed}: {run_dir} was finished with a different config "
                                         f"({changed}); {_copied_from(run_dir) or _RETRAIN}")
    check_ensembles(config, runs)
    _check_finished_ensembles(config, runs, workdir)
    check_run_inputs(config, runs, workdir)
    if check_fn is not None:
        check_arms(config, runs, workdir, check_fn)
    seeds = {}  # {arm or ensemble: its seeds}: the plan, and the table, cover this study's runs only
    for arm, seed, _ in runs:
        seeds.setdefault(arm, []).append(seed)
    for ens in config.study.ensembles:
        seeds[ens["name"]] = sorted(_ensemble_members(ens, runs, workdir))
    import jax
    if jax.process_index() == 0:  # (process 0 writes the study's files)
        report.write_study_plan(workdir, seeds, title=config.study.title, description=config.study.description,
                                command=command)
    for arm, seed, run_config in runs:
        run_dir = os.path.join(workdir, arm, f"seed_{seed}")
        if os.path.exists(os.path.join(run_dir, "results.json")):
            print(f"[study] {arm} seed {seed}: already finished, skipped", flush=True)
            continue
        if stop := preemption.requested():  # a signal during the previous run's evaluation or start-up
            return {"preempted_at_step": None, "signal": stop.name, "before": f"{arm} seed {seed}"}
        print(f"[study] {arm} seed {seed}: training in {run_dir}", flush=True)
        out = train_fn(run_config, run_dir)
        if "preempted_at_step" in out:
            return out
    for ens in config.study.ensembles:
        if stop := preemption.requested():
            return {"preempted_at_step": None, "signal": stop.name, "before": f"ensemble {ens['name']}"}
        _run_ensemble(ens, runs, workdir)
    if jax.process_index() != 0:  # process 0 writes the study's report (two writers raced on results.json)
        return {}
    return report.write_study_report(workdir, list(seeds), title=config.study.title,
                                     description=config.study.description, command=command, seeds=seeds)


def _run_ensemble(ens, runs, workdir: str) -> None:
    """Evaluates, per seed, the ensemble of the given arms' selected checkpoints."""
    from transferlab.ensemble import evaluate_ensemble
    for seed, members in sorted(_ensemble_members(ens, runs, workdir).items()):
        out_dir = os.path.join(workdir, ens["name"], f"seed_{seed}")
        if os.path.exists(os.path.join(out_dir, "results.json")):
            continue
        print(f"[study] ensemble {ens['name']} seed {seed}: {len(members)} members", flush=True)
        evaluate_ensemble(members, out_dir)
