"""Run directories -> results tables (mean ± std over seeds).

`python -m transferlab.report DIR` prints the table of a study workdir (or of
any directory whose sub-directories hold results.json files)."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from transferlab import files, provenance
from transferlab.errors import OneLineArgumentParser, UserError, exit_with


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable results file ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a results file (expected a JSON object, got {type(obj).__name__})")
    return obj


# key path -> the type a run's results.json holds there (what the table reads)
RESULT_FIELDS = {("model",): str, ("task",): str, ("dataset",): str, ("selection",): str, ("seed",): int,
                 ("total_steps",): int, ("wall_time_s",): (int, float), ("validation", "accuracy"): (int, float),
                 ("test",): dict}
# results.json keys the seeds of one table row must share
RECIPE_FIELDS = ("model", "task", "dataset", "selection", "total_steps")


def check_results(path: str, results: dict) -> dict:
    """`results` if it holds what the table reads (a test accuracy is optional: no test split), else a
    one-line UserError naming the file and the key."""
    fields = dict(RESULT_FIELDS)
    if isinstance(results.get("test"), dict) and "accuracy" in results["test"]:
        fields[("test", "accuracy")] = (int, float)
    for keys, kind in fields.items():
        value = results
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: {'.'.join(keys)} is {value!r}; not a results file of this library")
    return results


def _seed_dirs(directory: str, seeds=None) -> list[str]:
    """The arm's seed_* directories; with `seeds`, only those seeds' (a study's own runs)."""
    if seeds is None:
        return sorted(d for d in glob.glob(os.path.join(directory, "seed_*")) if os.path.isdir(d))
    return [d for seed in sorted(seeds) if os.path.isdir(d := os.path.join(directory, f"seed_{seed}"))]


def load_results(directory: str, seeds=None) -> list[dict]:
    """The results.json of each of the arm's runs (`seeds`: only those); a UserError when they were trained
    differently (one row averages the seeds of one recipe)."""
    results = [check_results(path, read_json(path)) for d in _seed_dirs(directory, seeds)
               if os.path.exists(path := os.path.join(d, "results.json"))]
    for other in results[1:]:
        for key in RECIPE_FIELDS:
            if other[key] != results[0][key]:
                raise UserError(
                    f"{directory}: seed_{results[0]['seed']} and seed_{other['seed']} were trained differently "
                    f"({key} {results[0][key]!r} vs {other[key]!r}), so their mean means nothing; move the runs "
                    "of the other recipe away")
    return results


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def unfinished_seeds(directory: str, seeds=None) -> list[str]:
    """The arm's runs without results.json (killed, still running or, with `seeds`, not yet started)."""
    dirs = _seed_dirs(directory) if seeds is None else [os.path.join(directory, f"seed_{s}") for s in sorted(seeds)]
    return [os.path.basename(d) for d in dirs if not os.path.exists(os.path.join(d, "results.json"))]


def summarize(arm: str, results: list[dict], unfinished=()) -> dict:
    """One table row; the test columns are None when a run has no test split (`dataset.test_split=''`).
    `unfinished`: the arm's seed directories without results, named in the seeds column (an arm of a
    study's plan with no finished run yet: a row of dashes, '0 of N')."""
    if not results:
        return {"arm": arm, "model": "—", "task": None, "dataset": None, "seeds": [],
                "test_accuracy_mean": None, "test_accuracy_std": None, "validation_accuracy_mean": None,
                "validation_accuracy_std": None, "selection": "—", "steps": "—", "wall_time_s_total": 0.0,
                "unfinished": list(unfinished)}
    test = [r["test"].get("accuracy") for r in results]
    val = [r["validation"]["accuracy"] for r in results]
    test_mean, test_std = mean_std(test) if None not in test else (None, None)
    val_mean, val_std = mean_std(val)
    return {
        "arm": arm, "model": results[0]["model"], "task": results[0]["task"],
        "dataset": results[0]["dataset"], "seeds": [r["seed"] for r in results],
        "test_accuracy_mean": test_mean, "test_accuracy_std": test_std,
        "validation_accuracy_mean": val_mean, "validation_accuracy_std": val_std,
        "selection": results[0]["selection"], "steps": results[0]["total_steps"],
        "wall_time_s_total": round(sum(r["wall_time_s"] for r in results), 1),
        "unfinished": list(unfinished),
    }


def _mean_pm_std(row: dict, metric: str) -> str:
    """'96.50 ± 0.46'; one seed has no sample std: just the value."""
    if row[f"{metric}_mean"] is None:
        return "—"
    mean, std = 100 * row[f"{metric}_mean"], 100 * row[f"{metric}_std"]
    return f"{mean:.2f} ± {std:.2f}" if len(row["seeds"]) > 1 else f"{mean:.2f}"


def _seeds(row: dict) -> str:
    """'3', or '1 of 2 (seed_1 unfinished)' while some of the arm's runs have no results."""
    unfinished = row.get("unfinished") or []
    if not unfinished:
        return str(len(row["seeds"]))
    return f"{len(row['seeds'])} of {len(row['seeds']) + len(unfinished)} ({', '.join(unfinished)} unfinished)"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| arm | model | test acc. % (mean ± std) | val. acc. % | seeds | selection | steps | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['model']} | {_mean_pm_std(r, 'test_accuracy')} | {_mean_pm_std(r, 'validation_accuracy')}"
            f" | {_seeds(r)} | {r['selection']} | {r['steps']} | {r['wall_time_s_total']} |")
    return "\n".join(lines)


def header(title: str = "", description: str = "", command: str = "") -> str:
    """The markdown above a study's table: its title, the config's description, the command that ran it."""
    parts = [f"# {title.strip()}"] if title.strip() else []
    if description.strip():
        parts.append(description.strip())
    if command:
        parts.append(f"Command: `{command}`")
    return "".join(part + "\n\n" for part in parts)


def write_study_report(workdir: str, arms, title: str = "", description: str = "", command: str = "",
                       seeds=None) -> dict:
    """Summarizes each arm under `workdir` into results.json and results.md; prints the table.

    `seeds` ({arm: seeds}), if given, limits each arm's row to those runs (a study's own: a seed directory
    left from an earlier study with other seeds is not averaged in); otherwise every seed_* is.
    results.md is the header (`header`), the table, a note on the statistics and one line
    summarizing the runs' environments (`provenance.summary_line`).
    """
    arms = list(dict.fromkeys(arms))
    seeds = seeds or {}
    results = {arm: load_results(os.path.join(workdir, arm), seeds.get(arm)) for arm in arms}
    rows = [summarize(arm, res, unfinished_seeds(os.path.join(workdir, arm), seeds.get(arm)))
            for arm, res in results.items() if res or seeds.get(arm)]
    table = markdown_table(rows)
    note = ("std is the sample standard deviation over seeds; test accuracy is measured once per run on the "
            "test split, which is never used for model selection; wall time is summed over seeds and includes "
            "compilation, evaluation and checkpointing.")
    environment = provenance.summary_line([r.get("environment") for res in results.values() for r in res])
    summary = {"title": title, "description": description, "command": command,
               "arms": rows, "note": note, "environment": environment}
    files.write_json(os.path.join(workdir, "results.json"), summary)
    files.write_text(os.path.join(workdir, "results.md"),
                     header(title, description, command) + table + "\n\n" + note + "\n\n" + environment + "\n")
    print("\n" + table + "\n\n" + note + "\n" + environment, flush=True)
    return summary


PLAN_FILE = "study.json"  # what a study writes before its first run: its arms and seeds in order, its heading


def write_study_plan(workdir: str, seeds: dict, title: str = "", description: str = "", command: str = "") -> None:
    """Records the study about to run ({arm or ensemble: seeds}, in order), so that `python -m
    transferlab.report` on an interrupted study keeps its heading and arm order and lists the arms and seeds
    that have not run yet."""
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, PLAN_FILE), {
        "title": title, "description": description, "command": command,
        "arms": [{"name": arm, "seeds": [int(s) for s in arm_seeds]} for arm, arm_seeds in seeds.items()]})


def _study_plan(workdir: str) -> dict | None:
    """{'seeds': {arm: seeds}, 'title', 'description', 'command'} from the study's plan file; None if it has
    none (a study older than it) or it is damaged (the report then falls back to what it finds)."""
    path = os.path.join(workdir, PLAN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        plan = read_json(path)
        seeds = {str(a["name"]): [int(s) for s in a["seeds"]] for a in plan["arms"]}
    except (UserError, KeyError, TypeError, ValueError):
        return None
    return {"seeds": seeds, **{k: str(plan.get(k) or "") for k in ("title", "description", "command")}}


def _study_seeds(rows) -> dict:
    """{arm: seeds} of a study's own report rows (finished and unfinished): rewriting its table keeps to the
    study's runs, not seed directories an earlier study left beside them. Arms without a row: every seed."""
    seeds = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("seeds"), list):
            continue
        unfinished = [u[len("seed_"):] for u in row.get("unfinished") or [] if isinstance(u, str)]
        seeds[row.get("arm")] = [s for s in row["seeds"] if isinstance(s, int)] + [
            int(u) for u in unfinished if u.isdigit()]
    return seeds


def main(argv=None) -> int:
    parser = OneLineArgumentParser(prog="python -m transferlab.report", description=__doc__,
                                   label="transferlab.report")
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        parser.error(f"{args.workdir}: no such directory")
    try:
        plan = _study_plan(args.workdir)
        if plan:  # the study's own arms, seeds (finished or not), order, heading, description and command
            seeds = plan["seeds"]
            arms = list(seeds)
            if not any(load_results(os.path.join(args.workdir, a), seeds[a]) for a in arms):
                raise UserError(f"{args.workdir}: none of the study's runs has finished yet")
            previous = plan
        else:  # a study older than its plan file: its last report, else every */seed_*
            previous = {}
            if os.path.isfile(os.path.join(args.workdir, "results.json")):
                previous = read_json(os.path.join(args.workdir, "results.json"))
            rows = previous.get("arms") if isinstance(previous.get("arms"), list) else []
            seeds = _study_seeds(rows)
            arms = sorted(d for d in os.listdir(args.workdir)
                          if load_results(os.path.join(args.workdir, d), seeds.get(d)))
            if not arms:
                raise UserError(f"{args.workdir}: no */seed_*/results.json under it")
            order = [row.get("arm") for row in rows if isinstance(row, dict)]
            arms = [a for a in order if a in arms] + [a for a in arms if a not in order]
        write_study_report(args.workdir, arms, seeds=seeds,
                           **{k: str(previous.get(k) or "") for k in ("title", "description", "command")})
    except UserError as e:
        print(f"{parser.label}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_with(main)
