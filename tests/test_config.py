"""Config loading and validation: every error path names the culprit in one line."""

import json
import os
import re
import textwrap

import ml_collections
import pytest

from transferlab import config as config_lib
from transferlab.errors import ConfigError

from conftest import REPO


def write_config(tmp_path, body: str, name="cfg.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


BASE = """
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.dataset = {'name': 'digits'}
    c.model = {'name': 'mlp'}
    %s
    return c
"""


def load(tmp_path, extra="", overrides=()):
    return config_lib.load(write_config(tmp_path, BASE % extra), overrides)


def test_defaults_merge_and_required_keys(tmp_path):
    c = load(tmp_path)
    for key in ("seed", "total_steps", "batch_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "mesh_shape"):
        assert key in c
    assert c.dataset.name == "digits" and c.model.name == "mlp"


def test_overrides_are_typed(tmp_path):
    c = load(tmp_path, overrides=["--config.total_steps=7", "--config.optimizer.learning_rate=1",
                                  "--config.augment.flip=True", "--config.model.kwargs.hidden_sizes=(8,)"])
    assert c.total_steps == 7 and isinstance(c.optimizer.learning_rate, float)
    assert c.augment.flip is True and tuple(c.model.kwargs.hidden_sizes) == (8,)


@pytest.mark.parametrize("extra, culprit", [
    ("c.totl_steps = 3", "totl_steps"),
    ("c.optimizer = {'nme': 'sgd'}", "optimizer.nme"),
    ("c.total_steps = 'many'", "total_steps"),
    ("c.batch_size = 1.5", "batch_size"),
    ("c.model = {'name': 'resnet9000'}", "resnet9000"),
    ("c.dataset = {'name': 'imaginary_ds'}", "imaginary_ds"),
    ("c.optimizer = {'name': 'lion2'}", "optimizer.name"),
    ("c.schedule = {'name': 'zigzag'}", "schedule.name"),
    ("c.mesh_shape = 'data=-1,model=2'", "mesh_shape"),
    ("c.total_steps = 0", "total_steps"),
    ("c.selection_metric = 'f1'", "selection_metric"),
    ("c.optimizer = {'freeze': '(['}", "optimizer.freeze"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'nope'},)}", "nope"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'kd', 'tmp': 3},)}", "tmp"),
    ("c.task = 'kd'; c.teacher = {'name': 'not_a_model'}", "teacher.name"),
    # found by a new user's mistakes (2026-11-27): each was accepted, or failed after compute or with a traceback
    ("c.optimizer = {'learning_rate': float('nan')}", "optimizer.learning_rate"),
    ("c.optimizer = {'weight_decay': float('inf')}", "optimizer.weight_decay"),
    ("c.seed = -1", "'seed'"),
    ("c.dataset = {'worker_count': -1}", "dataset.worker_count"),
    ("c.dataset = {'eval_split': ''}", "dataset.eval_split"),
    ("c.schedule = {'name': 'step', 'boundaries': (5,), 'decay_factor': -1.0}", "schedule.decay_factor"),
    ("c.schedule = {'name': 'step', 'boundaries': (0.5, 1.5)}", "schedule.boundaries"),
    ("c.schedule = {'warmup_steps': 10 ** 6}", "schedule.warmup_steps"),
    ("c.optimizer = {'momentum': -0.5}", "optimizer.momentum"),
    ("c.optimizer = {'b1': 1.5}", "optimizer.b1"),
    ("c.teacher = {'name': 'mlp'}; c.teacher.checkpoint = 'x'; c.distill = {'terms': ({'name': 'kd'},)}",
     "task is 'classify'"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ('kd',)}", "distill.terms[0]"),
    ("c.distill = {'terms': {'name': 'kd'}}", "distill.terms"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.extra_teachers = ({'name': 'mlp', 'dtype': 'fp16'},)",
     "extra_teachers[0].dtype"),
    ("c.task = 'dml'; c.dml = {'peers': ('resnet8',)}", "dml.peers[0]"),
    ("c.task = 'dml'; c.dml = {'peers': ({'name': 'mlp'}, {'name': 'mlp'})}", "dml.num_students"),
    ("c.study = {'arms': ({'name': 'a'}, {'name': 'a'})}", "used by an earlier arm"),
    ("c.study = {'arms': ({'name': 'checkpoints'},)}", "name 'checkpoints' is taken by the study's own files"),
    ("c.study = {'arms': ({'name': '../escape'},)}", "plain directory name"),
    ("c.study = {'arms': ({'name': 'a', 'seeds': 3},)}", "seeds must be a list"),
    # a third audit (2026-11-27, studies): each was accepted and ignored, wrote outside the workdir, or failed late
    ("c.study = {'seeds': ('x',), 'arms': ({'name': 'a'},)}", "study: seeds must be a list of ints >= 0"),
    ("c.study = {'seeds': (True,), 'arms': ({'name': 'a'},)}", "study: seeds must be a list of ints >= 0"),
    ("c.study = {'seeds': (0, 0), 'arms': ({'name': 'a'},)}", "study: seeds (0, 0) repeat a seed"),
    ("c.study = {'seeds': tuple(range(1001)), 'arms': ({'name': 'a'},)}", "study: 1001 seeds; at most 1000"),
    ("c.study = {'arms': ({'name': 'a', 'seeds': (1, 1)},)}", "study.arms[0] (a): seeds (1, 1) repeat a seed"),
    ("c.study = {'arms': ({'name': 'a', 'overrides': {'seed': 7}},)}", "overrides 'seed', which the study sets"),
    ("c.study = {'arms': ({'name': 'a', 'overrides': {'study.arms': ()}},)}", "an arm's run is not a study"),
    ("c.study = {'arms': ({'name': 'results.json'},)}", "taken by the study's own files"),
    ("c.study = {'arms': ({'name': 'study.json'},)}", "taken by the study's own files"),
    ("c.study = {'arms': ({'name': 'a', 'overrides': {1: 2}},)}", "override key 1: expected a dotted config key"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': '..', 'arms': ('a',)},)}",
     "study.ensembles[0]: name '..' must be a plain directory name"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': '../x', 'arms': ('a',)},)}", "plain directory"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': 5, 'arms': ('a',)},)}", "name 5 must be a plain"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': 'a', 'arms': ('a',)},)}", "used by an earlier arm"),
    ("e = {'name': 'e', 'arms': ('a',)}; c.study = {'arms': ({'name': 'a'},), 'ensembles': (e, dict(e))}",
     "study.ensembles[1]: name 'e' is used by an earlier arm or ensemble"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': 'e', 'arms': ()},)}", "at least one arm from"),
    ("c.study = {'arms': ({'name': 'a'},), 'ensembles': ({'name': 'e', 'arms': ('b',)},)}", "at least one arm from"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'kd'},), 'teacher_weights': (1.0,)}",
     "teacher_combination is 'average'"),
    # a second new-user audit (2026-11-27): each was accepted and silently ignored, or selected on test
    ("c.schedule = {'name': 'cosine', 'boundaries': (2,)}", "'schedule.boundaries' is set but schedule.name is 'cosine'"),
    ("c.total_steps = 50; c.schedule = {'name': 'step', 'boundaries': (60,)}", "step 60 is not before total_steps 50"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'ce_weight': 0.0, 'terms': ({'name': 'kd', "
     "'weight': 0.0},)}", "ce_weight == 0 and every term's weight is 0: nothing to train"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'kd'},)}; "
     "c.extra_teachers = ({'name': 'mlp', 'checkpoint': 'x', 'kwargs': {'hidden_size': 3}},)",
     "config key 'extra_teachers[0].kwargs': model 'mlp' got unknown kwarg 'hidden_size'"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'kd'},)}; "
     "c.extra_teachers = ({'name': 'mlp', 'checkpoint': 'x', 'kwargs': 3},)",
     "config key 'extra_teachers[0].kwargs': expected a dict of the model's arguments, got 3"),
    ("c.selection = 'best'; c.dataset.eval_split = 'test'", "'dataset.eval_split': 'test' reads the 'test' split"),
    ("c.selection = 'best'; c.dataset.eval_split = 'test[:50%]'", "'dataset.eval_split': 'test[:50%]' reads the"),
    # a third audit: the splits swapped, or the test split summed into the eval split
    ("c.selection = 'best'; c.dataset.eval_split = 'test'; c.dataset.test_split = 'validation'",
     "'dataset.eval_split': 'test' reads the 'test' split, and selection='best' would select the model on test"),
    ("c.selection = 'best'; c.dataset.eval_split = 'validation+test[:10]'", "reads the 'test' split"),
    ("c.task = 'dml'; c.dml = {'num_students': 0}", "needs at least 2 students, got 0"),
    ("c.task = 'dml'; c.dml = {'peers': ({'name': 'resnet9'},)}", "dml.peers[0].name"),
    ("c.task = 'dml'; c.dml = {'peers': ({'name': 'mlp', 'kwargs': {'depth': 3}},)}", "dml.peers[0].kwargs"),
    ("c.dml = {'num_students': 3}", "'dml.num_students' is set but task is 'classify'"),
    ("c.distill = {'hard_augment': {'enabled': True}}", "'distill.hard_augment.enabled' is set but task is 'classify'"),
    ("c.task = 'dml'; c.distill = {'ce_weight': 0.0}", "'distill.ce_weight' is set but task is 'dml'"),
    ("c.task = 'kd'; c.teacher = {'name': 'mlp'}; c.distill = {'terms': ({'name': 'kd'},)}; "
     "c.sla = {'transform': 'color_permutation'}", "'sla.transform' is set but task is 'kd'"),
    ("c.task = 'kd'; c.teacher = {'name': 'resnet8x4'}; c.teacher.checkpoint = 'self_ema'; "
     "c.distill = {'terms': ({'name': 'kd'},)}", "'teacher.name' is set but teacher.checkpoint='self_ema'"),
    ("c.task = 'kd'; c.teacher = {'name': '', 'kwargs': {'hidden_sizes': (9,)}}; "
     "c.distill = {'terms': ({'name': 'kd'},)}", "'teacher.kwargs' is set but teacher.name is ''"),
    ("c.task = 'kd'; c.teacher = {'name': '', 'dtype': 'bfloat16'}; c.distill = {'terms': ({'name': 'kd'},)}",
     "'teacher.dtype' is set but teacher.name is ''"),
])
def test_bad_config_names_the_culprit(tmp_path, extra, culprit):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    message = str(info.value)
    assert culprit in message and "\n" not in message


@pytest.mark.parametrize("override, culprit", [
    ("--config.nope=1", "nope"),
    ("--config.dataset.nme=x", "dataset.nme"),
    ("--config.seed=abc", "seed"),
    ("--config.total_steps", "total_steps"),
    ("--config.dml.peers.name=x", r"'dml.peers' is a tuple, not a section; set it whole \(--config.dml.peers=...\)"),
])
def test_bad_override_names_the_key(tmp_path, override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load(tmp_path, overrides=[override])


def test_list_entries_may_be_config_dicts(tmp_path):
    """`distill.terms` / `extra_teachers` written with ml_collections.ConfigDict entries read as dicts."""
    config = load(tmp_path, "c.task = 'kd'\n    c.teacher = {'name': 'mlp', 'checkpoint': 'random'}\n"
                            "    c.distill = {'terms': (ml_collections.ConfigDict({'name': 'kd', 'weight': 0.5}),)}\n"
                            "    c.extra_teachers = [ml_collections.ConfigDict({'name': 'mlp', 'checkpoint': 'random'})]")
    assert config.distill.terms[0] == {"name": "kd", "weight": 0.5}
    assert type(config.extra_teachers[0]) is dict
    config_lib.apply_override(config, "distill.terms", (ml_collections.ConfigDict({"name": "dkd"}),))  # (arms)
    assert type(config.distill.terms[0]) is dict


STUDY = """
    c.total_steps = 40
    c.study = {'seeds': (0, 1), 'arms': ({'name': 'teacher', 'overrides': {'total_steps': 60, 'model.kwargs':
               {'hidden_sizes': (64,)}}}, {'name': 'student'})}
"""


@pytest.mark.parametrize("override, message", [
    ("--config.total_steps=20", "override 'total_steps': study arm 'teacher' sets 'total_steps' itself"),
    ("--config.model.kwargs.hidden_sizes=(8,)", "override 'model.kwargs.hidden_sizes': study arm 'teacher' sets "
                                                "'model.kwargs'"),
    ("--config.seed=7", "override 'seed': a study's runs take their seeds from study.seeds"),
])
def test_overrides_a_study_would_overrule_are_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, STUDY, overrides=[override])
    load(tmp_path, STUDY, overrides=["--config.batch_size=32", "--config.study.seeds=(3,)"])  # not set by arms


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config_lib.load(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="get_config"):
        config_lib.load(write_config(tmp_path, "x = 1\n"))
    with pytest.raises(ConfigError, match="takes no argument"):
        config_lib.load(write_config(tmp_path, "def get_config():\n    return {}\n") + ":a=1")
    with pytest.raises(ConfigError, match="defines no get_config"):
        config_lib.load(write_config(tmp_path, "get_config = {'total_steps': 3}\n"))
    with pytest.raises(ConfigError, match="get_config failed: SystemExit"):
        config_lib.load(write_config(tmp_path, "import sys\ndef get_config():\n    sys.exit('no')\n"))
    with pytest.raises(ConfigError, match="cannot execute it: SystemExit: 0"):  # (exited 0, silently)
        config_lib.load(write_config(tmp_path, "import sys\nsys.exit(0)\n", name="exits.py"))
    with pytest.raises(ConfigError, match="config argument 'step': expected one of steps, seeds"):
        config_lib.load(os.path.join(REPO, "experiments", "kd", "quickstart.py") + ":step=5")
    for arg in ("seeds=0", "seeds=-1", "seeds=x", "steps=1.5"):  # (seeds=0 ran one seed, the default `seed`)
        expected = "an integer in \\[1, 1000\\]" if arg.startswith("seeds") else "an integer >= 1"
        with pytest.raises(ConfigError, match=f"config argument {arg}: expected {expected}"):
            config_lib.load(os.path.join(REPO, "experiments", "kd", "quickstart.py") + ":" + arg)
    with pytest.raises(ConfigError, match=r"config argument seeds=1000000000: expected an integer in \[1, 1000\]"):
        config_lib.load(os.path.join(REPO, "experiments", "kd", "quickstart.py") + ":seeds=1000000000")
    with pytest.raises(ConfigError, match="config argument generations=0: expected an integer >= 1"):
        config_lib.load(os.path.join(REPO, "experiments", "kd", "born_again.py") + ":generations=0")
    text = tmp_path / "tiny.txt"  # any file name (a spec loader refused what does not end in .py: a traceback)
    text.write_text("def get_config(arg=None):\n    return {'total_steps': 7}\n")
    assert config_lib.load(str(text)).total_steps == 7
    for body, key in (("{'optimizer.learning_rate': 0.1}", "'optimizer.learning_rate'"), ("{5: 1}", "5"),
                      ("{'optimizer': {'': 1}}", "optimizer.''")):
        with pytest.raises(ConfigError, match=f"key {re.escape(key)} of the returned dict: keys are non-empty"):
            config_lib.load(write_config(tmp_path, f"def get_config(arg=None):\n    return {body}\n",
                                         name="keys.py"))
    ignores = write_config(tmp_path, "def get_config(arg=None):\n    return {'total_steps': 300}\n", name="ign.py")
    with pytest.raises(ConfigError, match="the argument 'steps=5' changes nothing .*parse_arg"):
        config_lib.load(ignores + ":steps=5")  # (it trained all 300 steps, silently)
    assert config_lib.load(ignores).total_steps == 300
    own = write_config(tmp_path, "def get_config(arg=None):\n    return {'model': {'name': arg or 'mlp'}}\n",
                       name="own.py")  # parses its argument itself
    assert config_lib.load(own + ":lenet5").model.name == "lenet5"
    assert config_lib.load(own + ":mlp").model.name == "mlp"  # (its default, given: it reads it all the same)
    needs = write_config(tmp_path, "def get_config(arg):\n    return {'total_steps': int(arg)}\n", name="needs.py")
    assert config_lib.load(needs + ":300").total_steps == 300  # (without it, it fails: it reads it)
    steps = write_config(tmp_path, "def get_config(arg=None):\n    return {'total_steps': int(arg) if arg else 4}\n",
                         name="steps.py")
    assert config_lib.load(steps + ":4").total_steps == 4  # its default, given (refused before: audit)


def test_mesh_shape_parsing():
    assert config_lib.parse_mesh_shape("data=-1,fsdp=2") == {"data": -1, "fsdp": 2}
    assert config_lib.parse_mesh_shape("data=4") == {"data": 4, "fsdp": 1}
    for bad in ("data=-1,fsdp=-1", "data=x", "data=0", "tensor=2"):
        with pytest.raises(ConfigError):
            config_lib.parse_mesh_shape(bad)


def test_every_experiment_config_validates():
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments")
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".py")]
    assert paths
    for path in paths:
        config_lib.load(path)


@pytest.mark.parametrize("override, message", [
    ("distill.ema_decay=1.5", "'distill.ema_decay' must be in \\[0, 1\\]"),
    ("distill.trilateral_lookahead_lr=-1.0", "'distill.trilateral_lookahead_lr' must be > 0"),
    ("distill.trilateral_outer=validation", "'distill.trilateral_outer': 'validation' is not one of held_out_half"),
    ("distill.hard_augment.scale=-1.0", "'distill.hard_augment.scale' must be > 0"),
    ("distill.hard_augment.hidden=0", "'distill.hard_augment.hidden' must be > 0"),
    ("optimizer.learning_rate=1e39", "'optimizer.learning_rate': 1e\\+39 is beyond float32's range"),
    ("distill.hard_augment.fraction=0.0", "'distill.hard_augment.fraction' must be in \\(0, 1\\], got 0.0"),
    ("distill.hard_augment.fraction=1.5", "'distill.hard_augment.fraction' must be in \\(0, 1\\], got 1.5"),
    ("distill.hard_augment.saturation_weight=-0.1", "'distill.hard_augment.saturation_weight' must be >= 0"),
    ("dml.temperature=0.0", "'dml.temperature' must be > 0"),
    ("dml.kl_weight=-1.0", "'dml.kl_weight' must be >= 0"),
    ("distill.ce_weight=-1.0", "'distill.ce_weight' must be >= 0"),
    ("distill.teacher_weights=(1.0, -2.0)", "'distill.teacher_weights': expected numbers >= 0 with a positive sum"),
    ("distill.teacher_weights=(0.0, 0.0)", "'distill.teacher_weights': expected numbers >= 0 with a positive sum"),
])
def test_scheme_settings_out_of_range_are_config_errors(override, message):
    config = config_lib.defaults()
    config_lib.apply_override(config, *config_lib.parse_override(override))
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_a_free_form_key_set_on_one_side_only_is_a_config_difference():
    """A finished run of the default MLP (256, 256) is not reused for `hidden_sizes=(16,)`, nor the reverse;
    a fixed key missing from an old config.json (added to defaults() since) is still ignored."""
    def config(**kwargs):
        c = config_lib.defaults()
        c.model.kwargs = kwargs
        return c

    def saved(c):  # as config.json holds it
        return json.loads(json.dumps(config_lib.to_plain(c)))

    saved_default = saved(config())
    assert "hidden_sizes: saved unset (the default), now [16]" in config_lib.first_difference(
        saved_default, config(hidden_sizes=(16,)))
    saved_small = saved(config(hidden_sizes=(32,)))
    assert "hidden_sizes: saved [32], now unset (the default)" in config_lib.first_difference(
        saved_small, config())
    assert config_lib.first_difference(saved_small, config(hidden_sizes=(32,))) is None
    old = dict(saved_default)
    old.pop("eval_batch_size")  # not compared anyway
    old["optimizer"] = {k: v for k, v in old["optimizer"].items() if k != "clip_grad_norm"}
    assert config_lib.first_difference(old, config()) is None


def test_one_run_directory_spelled_two_ways_is_no_config_difference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def config(teacher, extra):
        return config_lib.from_dict({"task": "kd", "dataset": {"name": "digits"},
                                     "teacher": {"name": "mlp", "checkpoint": teacher},
                                     "extra_teachers": ({"name": "mlp", "checkpoint": extra},),
                                     "distill": {"teacher_combination": "average"}})
    saved = json.loads(json.dumps(config_lib.to_plain(config("runs/teacher/", "./runs/other"))))
    assert config_lib.first_difference(saved, config(str(tmp_path / "runs" / "teacher"), "runs/other")) is None
    assert "teacher.checkpoint" in config_lib.first_difference(saved, config("runs/teacher2", "runs/other"))
    assert "extra_teachers" in config_lib.first_difference(saved, config("runs/teacher", "runs/another"))
    assert config_lib.first_difference(json.loads(json.dumps(config_lib.to_plain(config("random", "random")))),
                                       config("random", "random")) is None


def test_a_teacher_that_moved_along_with_its_study_is_no_config_difference():
    """A study directory copied from a pod, or renamed: its KD runs' teachers (sibling runs) moved with them."""
    def config(teacher, extra="/ckpt/outside"):
        return config_lib.from_dict({"task": "kd", "dataset": {"name": "digits"},
                                     "teacher": {"name": "mlp", "checkpoint": teacher},
                                     "extra_teachers": ({"name": "mlp", "checkpoint": extra},),
                                     "distill": {"teacher_combination": "average"}})
    old_run, new_run = "/pod/study/kd/seed_0", "/laptop/copy/study/kd/seed_0"
    saved = json.loads(json.dumps(config_lib.to_plain(config("/pod/study/teacher/seed_0",
                                                             "/pod/study/teacher2/seed_0"))))
    for recorded in (old_run, None):  # config.json records the run's directory; runs before 2026-11-28 did not
        if recorded:
            saved["_run_dir"] = recorded
        moved = config("/laptop/copy/study/teacher/seed_0", "/laptop/copy/study/teacher2/seed_0")
        assert config_lib.first_difference(saved, moved, new_run) is None
        assert "saved [{'name': 'mlp', 'checkpoint': '/pod/study/teacher2/seed_0'}]" in config_lib.first_difference(
            saved, moved)  # (without the run's directory now, nothing says the teachers moved with it)
        other = config("/laptop/copy/study/teacher_b/seed_0", "/laptop/copy/study/teacher2/seed_0")
        assert "teacher.checkpoint" in config_lib.first_difference(saved, other, new_run)
        other = config("/laptop/copy/study/teacher/seed_1", "/laptop/copy/study/teacher2/seed_0")
        assert "teacher.checkpoint" in config_lib.first_difference(saved, other, new_run)
        other = config("/laptop/copy/study/teacher/seed_0", "/laptop/copy/study/teacher3/seed_0")
        assert "extra_teachers" in config_lib.first_difference(saved, other, new_run)
    # a teacher outside the study keeps its absolute path; the run moved without it
    saved = json.loads(json.dumps(config_lib.to_plain(config("/ckpt/teacher"))))
    saved["_run_dir"] = old_run
    assert config_lib.first_difference(saved, config("/ckpt/teacher"), new_run) is None
    assert "teacher.checkpoint" in config_lib.first_difference(saved, config("/laptop/ckpt/teacher"), new_run)


def test_a_teacher_still_where_it_was_did_not_move_along(tmp_path):
    """Only a teacher that left its old place moved with the run: one still there is another teacher, and a run
    that did not move did not take its teacher anywhere. Relative paths start where the run was started."""
    def config(teacher):
        return config_lib.from_dict({"task": "kd", "dataset": {"name": "digits"},
                                     "teacher": {"name": "mlp", "checkpoint": teacher}})
    old, new = tmp_path / "x", tmp_path / "y"
    (old / "teacher").mkdir(parents=True)
    (new / "teacher").mkdir(parents=True)
    saved = json.loads(json.dumps(config_lib.to_plain(config(str(old / "teacher")))))
    for recorded in (str(old / "kd"), None):
        saved.pop("_run_dir", None)
        if recorded:
            saved["_run_dir"] = recorded
        assert "teacher.checkpoint" in config_lib.first_difference(saved, config(str(new / "teacher")), str(new / "kd"))
    (old / "teacher").rmdir()  # now it moved (to y, as the run did)
    assert config_lib.first_difference(saved, config(str(new / "teacher")), str(new / "kd")) is None
    saved["_run_dir"] = str(new / "kd")  # ... but not if the run itself is where it was
    assert "teacher.checkpoint" in config_lib.first_difference(saved, config(str(new / "teacher")), str(new / "kd"))
    # a relative teacher path is resolved from the directory the run was started in (`_cwd`), not today's
    relative = json.loads(json.dumps(config_lib.to_plain(config("teacher"))))
    relative.update(_run_dir=str(old / "kd"), _cwd=str(old))
    assert config_lib.first_difference(relative, config(str(new / "teacher")), str(new / "kd")) is None
    relative["_cwd"] = str(new)
    assert config_lib.first_difference(relative, config(str(new / "teacher"))) is None


def test_a_run_older_than_a_behaviour_changing_default_resumes_only_with_its_old_value():
    """HARD's `fraction` and `saturation_weight` (2026-11-28) changed what a HARD run trains: a HARD run saved
    before them lacks both keys and ran with all images warped and no penalty; other runs do not use them."""
    def config(enabled, **hard):
        return config_lib.from_dict({"task": "kd", "dataset": {"name": "digits"},
                                     "teacher": {"name": "mlp", "checkpoint": "/ckpt/teacher"},
                                     "distill": {"hard_augment": {"enabled": enabled, **hard}}})
    for enabled in (True, False):
        saved = json.loads(json.dumps(config_lib.to_plain(config(enabled))))
        del saved["distill"]["hard_augment"]["fraction"], saved["distill"]["hard_augment"]["saturation_weight"]
        difference = config_lib.first_difference(saved, config(enabled))
        if enabled:
            assert difference == "distill.hard_augment.fraction: saved 1.0, now 0.5"
            assert "saturation_weight: saved 0.0, now 0.1" in config_lib.first_difference(saved, config(
                enabled, fraction=1.0))
            assert config_lib.first_difference(saved, config(enabled, fraction=1.0, saturation_weight=0.0)) is None
        else:
            assert difference is None


def test_an_arms_string_override_is_a_string(tmp_path):
    """Arm overrides are Python values: '5' for an int key was parsed like a command-line value and accepted,
    while the same string at the top of the config file is refused."""
    from transferlab import study
    config = config_lib.from_dict({"dataset": {"name": "digits"}, "study": {"arms": (
        {"name": "a", "overrides": {"total_steps": "5"}},)}})
    with pytest.raises(ConfigError, match=r"study.arms\[0\] \(a\): config key 'total_steps': expected int, got '5'"):
        study.resolve_arms(config, str(tmp_path))
    config.study.arms = ({"name": "a", "overrides": {"total_steps": 5, "dataset.train_split": "train[:100]"}},)
    (_, _, run), = study.resolve_arms(config, str(tmp_path))
    assert run.total_steps == 5 and run.dataset.train_split == "train[:100]"
