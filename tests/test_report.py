"""transferlab.report: study tables, their header, and the report CLI's handling of bad directories."""

import json
import os

import pytest

from transferlab import report


def _run(workdir, arm, seed, accuracy, total_steps=10):
    run_dir = os.path.join(workdir, arm, f"seed_{seed}")
    os.makedirs(run_dir)
    results = {"model": "mlp", "task": "classify", "dataset": "mnist5k", "seed": seed, "selection": "last step",
               "total_steps": total_steps, "wall_time_s": 1.5, "test": {"accuracy": accuracy},
               "validation": {"accuracy": accuracy - 0.01}}
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


def test_study_report_has_header_table_mean_std_and_note(tmp_path):
    workdir = str(tmp_path)
    for seed, acc in enumerate((0.90, 0.92, 0.94)):
        _run(workdir, "student", seed, acc)
    _run(workdir, "teacher", 0, 0.99)
    summary = report.write_study_report(workdir, ["teacher", "student"], title="My study",
                                        description="Setup paragraph.", command="python -m transferlab.main x")
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# My study\n\nSetup paragraph.\n\nCommand: `python -m transferlab.main x`\n\n| arm |")
    assert text.index("| teacher |") < text.index("| student |")  # the study's arm order
    assert "| student | mlp | 92.00 ± 2.00 |" in text  # mean ± sample std (ddof=1) over 3 seeds
    assert "| teacher | mlp | 99.00 | 98.00 | 1 |" in text  # one seed: no sample std to show
    assert summary["arms"][1]["wall_time_s_total"] == 4.5
    assert report.header() == ""  # no title, description or command: the table alone


def test_report_cli_keeps_the_studys_header_and_arm_order(tmp_path, capsys):
    workdir = str(tmp_path)
    _run(workdir, "zeta", 0, 0.5)
    _run(workdir, "alpha", 0, 0.6)
    report.write_study_report(workdir, ["zeta", "alpha"], title="T", description="D", command="C")
    os.remove(os.path.join(workdir, "results.md"))
    assert report.main([workdir]) == 0
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# T\n\nD\n\nCommand: `C`\n\n") and text.index("| zeta |") < text.index("| alpha |")


def test_report_cli_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "missing: no such directory" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2  # no runs under it
    assert "no */seed_*/results.json" in capsys.readouterr().err
    os.makedirs(tmp_path / "arm" / "seed_0")
    (tmp_path / "arm" / "seed_0" / "results.json").write_text("{truncated")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json: not a readable results file" in err
    (tmp_path / "arm" / "seed_0" / "results.json").write_text("[1, 2]")
    assert report.main([str(tmp_path)]) == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err


def test_report_bad_results_content_is_one_line_naming_the_file_and_key(tmp_path, capsys):
    _run(str(tmp_path), "arm", 0, 0.9)
    path = tmp_path / "arm" / "seed_0" / "results.json"
    good = json.loads(path.read_text())
    for bad, key in (({}, "model"), ({**good, "test": {"accuracy": "x"}}, "test.accuracy"),
                     ({**good, "validation": None}, "validation.accuracy"), ({**good, "seed": True}, "seed")):
        path.write_text(json.dumps(bad))
        assert report.main([str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"results.json: {key} is " in err, err
    path.write_text(json.dumps(good))
    (tmp_path / "results.json").write_text(json.dumps({"arms": 5}))  # the study's own summary, damaged
    assert report.main([str(tmp_path)]) == 0


def test_a_study_without_a_test_split_reports_validation_only(tmp_path):
    _run(str(tmp_path), "arm", 0, 0.9)
    path = tmp_path / "arm" / "seed_0" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "test": {}}))  # dataset.test_split = ''
    summary = report.write_study_report(str(tmp_path), ["arm"])
    assert summary["arms"][0]["test_accuracy_mean"] is None
    assert "| arm | mlp | — | 89.00 | 1 |" in (tmp_path / "results.md").read_text()


def test_an_arm_with_unfinished_seeds_says_so_in_its_seeds_column(tmp_path):
    """A killed study reported by hand: the mean is over the finished seeds, and the row says which are not."""
    workdir = str(tmp_path)
    _run(workdir, "student", 0, 0.90)
    _run(workdir, "student", 2, 0.94)
    os.makedirs(os.path.join(workdir, "student", "seed_1", "checkpoints"))  # killed before its results
    assert report.main([workdir]) == 0
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        text = f.read()
    assert "| student | mlp | 92.00 ± 2.83 | 91.00 ± 2.83 | 2 of 3 (seed_1 unfinished) |" in text


def test_a_closed_stdout_ends_the_cli_quietly():
    """`python -m transferlab.report DIR | head`: the reader goes away; exit 141 (a shell's SIGPIPE code),
    no BrokenPipeError traceback."""
    import subprocess
    import sys
    code = "from transferlab.errors import exit_with\nexit_with(lambda: [print('row ' * 50) for _ in range(20000)] and 0)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_a_study_table_covers_its_own_seeds_and_never_mixes_recipes(tmp_path, capsys):
    """Seeds 0-1 of an earlier 5-step study stay in the arm's directory; a study of seed 2 at 200 steps
    reports seed 2 alone; the report CLI, which reads every seed, refuses to average the two recipes."""
    workdir = str(tmp_path)
    _run(workdir, "student", 0, 0.30, total_steps=5)
    _run(workdir, "student", 1, 0.32, total_steps=5)
    _run(workdir, "student", 2, 0.96, total_steps=200)
    os.makedirs(os.path.join(workdir, "student", "seed_7"))  # an abandoned run of another study
    summary = report.write_study_report(workdir, ["student"], seeds={"student": [2]})
    (row,) = summary["arms"]
    assert (row["seeds"], row["steps"], row["unfinished"]) == ([2], 200, [])
    assert row["test_accuracy_mean"] == pytest.approx(0.96)
    with pytest.raises(report.UserError, match=r"seed_0 and seed_2 were trained differently \(total_steps 5 vs 200\)"):
        report.write_study_report(workdir, ["student"])
    assert report.main([workdir]) == 0  # the CLI rewrites the study's table over the study's own seeds
    (row,) = json.load(open(os.path.join(workdir, "results.json")))["arms"]
    assert (row["seeds"], row["steps"]) == ([2], 200)
    os.remove(os.path.join(workdir, "results.json"))  # no study report: every seed, and the two recipes refused
    assert report.main([workdir]) == 2
    assert "trained differently" in capsys.readouterr().err


def test_an_interrupted_study_is_reported_from_its_plan(tmp_path, capsys):
    """Stopped in its second arm: the report keeps the heading and arm order the study wrote before its first
    run, and lists the arms and seeds that have not run (it dropped the heading, sorted the arms by name and
    left the unstarted arm out)."""
    workdir = str(tmp_path)
    report.write_study_plan(workdir, {"teacher": [0], "scratch": [0, 1], "kd": [0, 1]}, title="T",
                            description="D", command="C")
    _run(workdir, "teacher", 0, 0.99)
    _run(workdir, "scratch", 0, 0.90)
    os.makedirs(os.path.join(workdir, "scratch", "seed_1", "checkpoints"))  # stopped here
    _run(workdir, "stray", 0, 0.5)  # not one of the study's arms
    assert report.main([workdir]) == 0
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# T\n\nD\n\nCommand: `C`\n\n")
    assert text.index("| teacher |") < text.index("| scratch |") < text.index("| kd |") and "stray" not in text
    assert "| scratch | mlp | 90.00 | 89.00 | 1 of 2 (seed_1 unfinished) |" in text
    assert "| kd | — | — | — | 0 of 2 (seed_0, seed_1 unfinished) | — | — | 0.0 |" in text
    with open(os.path.join(workdir, report.PLAN_FILE), "w", encoding="utf-8") as f:
        f.write('{"arms": [{"name": 3')  # damaged: the report falls back to what it finds
    assert report.main([workdir]) == 0
    empty = tmp_path / "empty"
    report.write_study_plan(str(empty), {"teacher": [0]})
    assert report.main([str(empty)]) == 2
    assert "none of the study's runs has finished yet" in capsys.readouterr().err
