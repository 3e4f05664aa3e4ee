"""Run directories -> results tables (mean ± std over seeds).

`python -m transferlab.report DIR` prints the table of a study workdir (or of
any directory whose sub-directories hold results.json files)."""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from transferlab import provenance


def load_results(directory: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "seed_*", "results.json"))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(arm: str, results: list[dict]) -> dict:
    test = [r["test"]["accuracy"] for r in results]
    val = [r["validation"]["accuracy"] for r in results]
    test_mean, test_std = mean_std(test)
    val_mean, val_std = mean_std(val)
    return {
        "arm": arm, "model": results[0]["model"], "task": results[0]["task"],
        "dataset": results[0]["dataset"], "seeds": [r["seed"] for r in results],
        "test_accuracy_mean": test_mean, "test_accuracy_std": test_std,
        "validation_accuracy_mean": val_mean, "validation_accuracy_std": val_std,
        "selection": results[0]["selection"], "steps": results[0]["total_steps"],
        "wall_time_s_total": round(sum(r["wall_time_s"] for r in results), 1),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| arm | model | test acc. % (mean ± std) | val. acc. % | seeds | selection | steps | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['model']} | {100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f}"
            f" | {100 * r['validation_accuracy_mean']:.2f} ± {100 * r['validation_accuracy_std']:.2f}"
            f" | {len(r['seeds'])} | {r['selection']} | {r['steps']} | {r['wall_time_s_total']} |")
    return "\n".join(lines)


def write_study_report(workdir: str, arms) -> dict:
    """Summarizes each arm under `workdir` into results.json and results.md; prints the table."""
    arms = list(dict.fromkeys(arms))
    results = {arm: res for arm in arms if (res := load_results(os.path.join(workdir, arm)))}
    rows = [summarize(arm, res) for arm, res in results.items()]
    table = markdown_table(rows)
    note = ("std is the sample standard deviation over seeds; test accuracy is measured once per run on the "
            "test split, which is never used for model selection.")
    environment = provenance.summary_line([r.get("environment") for res in results.values() for r in res])
    summary = {"arms": rows, "note": note, "environment": environment}
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + note + "\n\n" + environment + "\n")
    print("\n" + table + "\n\n" + note + "\n" + environment, flush=True)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    arms = sorted(d for d in os.listdir(args.workdir) if load_results(os.path.join(args.workdir, d)))
    write_study_report(args.workdir, arms)


if __name__ == "__main__":
    main()
