"""Export a finished run's deployable model: the student's params and BN statistics, nothing else.

    python -m transferlab.export --workdir RUN --out DIR [--config FILE] [--student K]

Reads RUN/config.json (the resolved config every run writes) and the checkpoint the run's
selection rule chose (`results.json`'s `selected_step`, else the latest), restores only
`params['model']` and `model_state['model']` onto one device (whatever mesh the run trained
on), and drops the rest: KD connectors, the SLA joint head, a self-distillation EMA teacher,
optimizer state. A DML run exports student 0 (`model`), or `--student K` (`dml.peers[K-1]`). Only the
run's model (and a DML run's peers) and dataset sections are read and checked. Writes

    DIR/variables/   an Orbax checkpoint of the flax variables {'params': ..., 'batch_stats': ...}
    DIR/model.json   {name, kwargs, dtype, num_classes, image_shape, input (the normalization the
                     model was trained with: dataset, mean, std), source run, step, git commit}

`load(DIR)` gives back `(module, variables)` for `module.apply(variables, images, train=False)`,
where `images` are normalized as in training: `preprocess(DIR, uint8_images)` does it
((pixels / 255 - mean) / std per channel, the data pipeline's normalization).
A run whose config file registered a model of its own (`models.register`) needs that file again:
`--config FILE` executes it first (and `load` needs the same registration in its process).
Bad input (no such run, no checkpoint, DIR not empty or not a directory) is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


def export(run_dir: str, out_dir: str, student: int = 0) -> dict:
    """Writes the export of `run_dir` into `out_dir`; returns the model.json content. A failed export leaves
    no `out_dir` it created. `student`: which of a DML run's students (0 = `model`, k = `dml.peers[k-1]`)."""
    from transferlab import checkpoint, files, models
    from transferlab.errors import UserError

    resolved = checkpoint.saved_config(run_dir)  # config.json, else (garbled) the checkpoint's own copy
    if resolved is None:
        from transferlab.main import arm_runs, study_runs
        for kind, runs in (("a study's", study_runs(run_dir)), ("a study arm's", arm_runs(run_dir))):
            if runs:
                more = f", ... ({len(runs)} in all)" if len(runs) > 3 else ""
                raise UserError(f"--workdir {run_dir!r}: is {kind} directory; export one of its runs "
                                f"({', '.join(runs[:3])}{more})")
        raise UserError(f"--workdir {run_dir!r}: its config.json cannot be read (missing or damaged), and no "
                        "checkpoint holds a copy: not a transferlab run directory?")
    resolved = dict(resolved)
    versions = resolved.pop("_versions", {})
    resolved["model"], param_key = _chosen_student(resolved, run_dir, student)
    name = (resolved.get("model") or {}).get("name")
    if name is not None and name not in models.names():
        raise UserError(f"--workdir {run_dir!r}: its model {name!r} is not a registered model; if the run's "
                        "config file registers it (models.register), pass that file with --config FILE")
    config = _student_config(resolved, run_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir!r} exists and is not a directory; choose a new directory")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out {out_dir!r} exists and is not empty; choose a new directory")
    created = files.outermost_missing(out_dir)  # (removed again if the export fails)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir!r}: cannot create it ({e.strerror or e})") from None
    try:
        if not os.access(out_dir, os.W_OK):
            raise UserError(f"--out {out_dir!r}: not writable")
        return _export_into(run_dir, out_dir, config, versions, param_key)
    except BaseException:
        if created:
            files.remove_if_nothing_written(created)
        raise


def _chosen_student(resolved: dict, run_dir: str, student: int) -> tuple[dict, str]:
    """(model section, params key) of student `student`: a DML run's `model` (0) or `dml.peers[k-1]` (k; a
    peer the config does not list is a copy of `model`); any other run has one student, 0."""
    from transferlab.errors import UserError

    from transferlab import checkpoint

    dml = resolved.get("dml") or {}
    peers = list(dml.get("peers") or ())
    count = max(int(dml.get("num_students") or 0), 1 + len(peers)) if resolved.get("task") == "dml" else 1
    if not 0 <= student < count:
        what = f"its {count} DML students are 0-{count - 1}" if count > 1 else \
            f"a {resolved.get('task', 'classify')!r} run has one student, 0 (--student picks a DML run's)"
        raise UserError(f"--student {student}: out of range for --workdir {run_dir!r} ({what})")
    key = "model" if student == 0 else f"peer{student}"
    return checkpoint.student_model(resolved, key), key


def _student_config(resolved: dict, run_dir: str):
    """The run's config, checked only where an export reads it: the student's model section and the
    dataset. The run's other sections (teachers, losses, mesh) are not needed, so a run finished under
    a config that today's checks refuse, or trained on a mesh this machine lacks, still exports."""
    from transferlab import config as config_lib
    from transferlab.errors import ConfigError, UserError

    config = config_lib.defaults()
    try:  # (keys an older version had elsewhere in the config do not matter here)
        config_lib.merge(config, {key: resolved[key] for key in ("model", "dataset") if key in resolved})
        config_lib.check_model_section("model", config.model)
    except ConfigError as e:
        raise UserError(f"--workdir {run_dir!r}: its config.json: {e}") from None
    return config


def _export_into(run_dir: str, out_dir: str, config, versions: dict, param_key: str = "model") -> dict:
    """Restores the student's variables onto this process's first device (whatever mesh the run trained on)
    and writes them with model.json."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from transferlab import checkpoint, config as config_lib, data, parallel
    from transferlab.errors import ConfigError, UserError
    from transferlab.tasks import common

    try:
        dataset = data.dataset_info(config.dataset.name, config.dataset.data_dir or None)
    except ConfigError as e:
        raise UserError(f"--workdir {run_dir!r}: the run's dataset (its classes and normalization): {e}") from None
    model = common.build_model(config.model, dataset.num_classes)
    images = jax.ShapeDtypeStruct((2, *dataset.image_shape), jnp.float32)
    params, state = jax.eval_shape(lambda x: common.init_model(model, jax.random.key(0), x), images)
    target = {"params": {param_key: params}, "model_state": {param_key: state}}
    one_device = parallel.replicated(parallel.make_mesh("data=1", jax.local_devices()[:1]))
    target = checkpoint.abstract_with_shardings(target, jax.tree.map(lambda _: one_device, target))
    restored, step = checkpoint.restore_selected_subtree(run_dir, target, f"--workdir {run_dir!r}")
    variables = {"params": restored["params"][param_key], **restored["model_state"][param_key]}
    info = {"name": config.model.name, "kwargs": config_lib.to_plain(config.model.kwargs),
            "dtype": config.model.dtype, "num_classes": dataset.num_classes,
            "image_shape": list(dataset.image_shape),
            "input": {"dataset": config.dataset.name, "mean": [float(m) for m in dataset.mean],
                      "std": [float(v) for v in dataset.std],
                      "normalization": "(uint8 pixels / 255 - mean) / std, per channel"},
            "source_run": os.path.abspath(run_dir), "student": param_key,
            "step": int(step), "git_commit": versions.get("git_commit", "unknown")}
    with ocp.StandardCheckpointer() as saver:
        saver.save(os.path.join(os.path.abspath(out_dir), VARIABLES_DIR), variables)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, MODEL_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return info


def _read_info(export_dir: str) -> dict:
    """An export's model.json; a directory without one is a UserError."""
    from transferlab.errors import UserError

    path = os.path.join(export_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{export_dir!r}: no {MODEL_FILE} (not a transferlab export)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(export_dir: str):
    """(module, variables) of an export: `module.apply(variables, images, train=False)` gives logits."""
    import jax
    import orbax.checkpoint as ocp

    from transferlab import models
    from transferlab.tasks import common

    info = _read_info(export_dir)
    module = models.create(info["name"], num_classes=info["num_classes"], dtype=common.DTYPES[info["dtype"]],
                           **info["kwargs"])
    images = jax.ShapeDtypeStruct((1, *info["image_shape"]), jax.numpy.float32)
    params, state = jax.eval_shape(lambda x: common.init_model(module, jax.random.key(0), x), images)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {"params": params, **state})
    with ocp.StandardCheckpointer() as reader:
        variables = reader.restore(os.path.join(os.path.abspath(export_dir), VARIABLES_DIR), abstract)
    return module, variables


def preprocess(export_dir: str, images):
    """uint8 images [B, H, W, C] -> the float32 input the exported model was trained on."""
    import numpy as np

    from transferlab.errors import UserError

    info = _read_info(export_dir)
    if "input" not in info:
        raise UserError(f"{os.path.join(export_dir, MODEL_FILE)}: made before exports recorded their input "
                        "normalization; export the run again")
    mean = np.asarray(info["input"]["mean"], np.float32)
    std = np.asarray(info["input"]["std"], np.float32)
    return (np.asarray(images, np.float32) / 255.0 - mean) / std


def main(argv=None) -> int:
    from transferlab.errors import OneLineArgumentParser
    parser = OneLineArgumentParser(prog="python -m transferlab.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished (or checkpointed) run directory")
    parser.add_argument("--out", required=True, help="new directory for the exported model")
    parser.add_argument("--config", default="", help="the run's config file, executed first for the models "
                        "it registers (only needed for a model of one's own)")
    parser.add_argument("--student", type=int, default=0, help="a DML run's student to export: 0 (`model`, the "
                        "default) or k (`dml.peers[k-1]`)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from transferlab.errors import UserError
    from transferlab.main import _quiet_library_warnings
    _quiet_library_warnings()
    try:
        if args.config:
            from transferlab import config as config_lib
            config_lib.load_file(args.config)  # (its registrations; the run's own config comes from RUN)
        info = export(args.workdir, args.out, args.student)
    except UserError as e:
        print(f"transferlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {info['name']} (step {info['step']}) of {args.workdir} to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    from transferlab.errors import exit_with
    exit_with(main)
