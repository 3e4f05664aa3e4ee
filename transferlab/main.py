"""Command line: `python -m transferlab.main --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]`.

Bad input (config key or value, unknown name, missing file, incompatible
checkpoint) prints one line on stderr and exits 2. A non-finite loss exits 3
with the last good checkpoint kept. Rerunning the same command on the same
workdir resumes. Multi-process runs (one process per host) pass
`--coordinator_address`, `--num_processes` and `--process_id`, or set the
environment that `jax.distributed.initialize()` auto-detects (SLURM, TPU pods).
On a CPU host the command first re-executes itself with mimalloc preloaded
(`transferlab/host_allocator.py`; `TRANSFERLAB_ALLOCATOR=system` keeps glibc's malloc).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shlex
import sys

from transferlab import errors, files

EXIT_USAGE = errors.EXIT_USAGE
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGTERM, a preemption, exits 0: the scheduler may requeue it)


def parse_args(argv):
    parser = errors.OneLineArgumentParser(prog="python -m transferlab.main", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg'")
    parser.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    parser.add_argument("--coordinator_address", default="", help="multi-process: host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=0, help="multi-process: number of processes")
    parser.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's id")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() with auto-detected cluster settings")
    known, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.KEY=VALUE)")
    for flag in ("--config", "--workdir", *PROCESS_FLAGS):
        if _times_given(flag, argv) > 1:
            parser.error(f"{flag} is given more than once")
    _check_process_flags(parser, known, argv)
    return known, rest


PROCESS_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def _times_given(flag: str, argv) -> int:
    """How often `flag` appears in `argv`, as `--flag VALUE` or `--flag=VALUE`."""
    return sum(a == flag or a.startswith(flag + "=") for a in argv)


def _check_process_flags(parser, args, argv) -> None:
    """Multi-process flags: all three of --coordinator_address HOST:PORT, --num_processes N >= 1 and
    --process_id in [0, N) together (or --distributed alone); checked before anything starts."""
    explicit = [f for f in PROCESS_FLAGS if _times_given(f, argv)]
    if args.distributed and explicit:
        parser.error(f"--distributed detects the cluster itself; drop {explicit[0]}")
    if not explicit:
        return
    if len(explicit) < 3:
        missing = [f for f in PROCESS_FLAGS if f not in explicit]
        parser.error(f"{explicit[0]} needs {' and '.join(missing)} too")
    host, _, port = args.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--coordinator_address {args.coordinator_address!r}: expected HOST:PORT")
    if args.num_processes < 1:
        parser.error(f"--num_processes {args.num_processes}: expected at least 1")
    if not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process_id {args.process_id}: expected 0 to {args.num_processes - 1}")


def run(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    from transferlab import preemption
    preemption.install()  # SIGTERM / Ctrl-C from here on: finish the step, save, stop
    try:
        return _run(args, overrides, argv)
    finally:  # (called in-process, e.g. from a notebook: its next run and its Ctrl-C start afresh)
        preemption.uninstall()


def _run(args, overrides, argv) -> int:
    from transferlab import config as config_lib, preemption, provenance
    _quiet_library_warnings()
    provenance.git_commit()  # the commit of the code this process imported (read once, see provenance)
    from transferlab.errors import NonFiniteLoss, UserError

    created = files.outermost_missing(args.workdir)  # (removed again if the command fails writing nothing)
    try:
        config = config_lib.load(args.config, overrides)
        check_workdir(args.workdir, study=bool(config.study.arms))
        import jax
        _use_compilation_cache(config.xla_cache_dir, args.workdir)
        if args.coordinator_address or args.distributed:
            kwargs = {}
            if args.coordinator_address:
                kwargs = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                              process_id=args.process_id)
            try:
                jax.distributed.initialize(**kwargs)
            except (ValueError, RuntimeError) as e:  # no cluster detected, an unreachable coordinator, ...
                raise UserError(f"jax.distributed.initialize: {errors.first_line(e)}") from None
            preemption.defer_to_jax()  # every process stops at the same step
            check_same_run_everywhere(config, args.workdir)
        from transferlab import study, train
        if config.study.arms:
            command = shlex.join(["python", "-m", "transferlab.main", *argv])
            out = study.run_study(config, args.workdir, train.train_and_evaluate, train.check_config, command)
        else:
            out = train.train_and_evaluate(config, args.workdir)
            for split in ("test", "validation"):  # (no test split configured: the validation accuracy)
                if "accuracy" in (out.get(split) or {}):
                    print(f"{split} accuracy {100 * out[split]['accuracy']:.2f}% "
                          f"(selection: {out['selection']}, step {out['selected_step']}); results in "
                          f"{os.path.join(args.workdir, 'results.json')}", flush=True)
                    break
    except UserError as e:
        _silence_unraisable()
        if created:
            from transferlab.report import PLAN_FILE
            files.remove_if_nothing_written(created, bookkeeping=(os.path.join(args.workdir, PLAN_FILE),))
        print(f"transferlab: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except NonFiniteLoss as e:
        print(f"transferlab: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except KeyboardInterrupt:  # a second Ctrl-C (preemption.StopFlag): no further save
        print("transferlab: interrupted; the last complete checkpoint is kept, rerun the same command to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if "preempted_at_step" in out:
        where = (f"at step {out['preempted_at_step']}" if out["preempted_at_step"] is not None
                 else f"before {out['before']}")
        signal_name = out.get("signal", "SIGTERM")
        print(f"stopped ({signal_name}) {where}; rerun the same command to resume", flush=True)
        return EXIT_INTERRUPTED if signal_name == "SIGINT" else 0
    return 0


# Keys that may differ between the processes of one run (each host's own data copy and reader threads)
PER_HOST_KEYS = ("dataset.data_dir", "dataset.worker_count")


def check_same_run_everywhere(config, workdir: str) -> None:
    """Every process of a multi-process run must be given the same config and --workdir: otherwise they
    disagree on steps, shapes or paths and hang in a collective (even SIGTERM cannot end them). Compared by a
    digest gathered from every process right after `jax.distributed.initialize`."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from transferlab import config as config_lib
    from transferlab.errors import UserError
    if jax.process_count() == 1:
        return
    plain = config_lib.to_plain(config)
    for key in PER_HOST_KEYS:
        section, name = key.split(".")
        plain.get(section, {}).pop(name, None)
    text = json.dumps([plain, os.path.normpath(workdir)], sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    others = [i for i in range(len(everyone)) if not np.array_equal(everyone[i], everyone[0])]
    if others:
        raise UserError(f"process {others[0]} was given another config or --workdir than process 0; every process "
                        "of a run needs the same --config, --config.KEY overrides and --workdir")


RUN_FILES = ("checkpoints", "config.json", "results.json")  # what a run writes in its directory
RUN_OWNED_DIRS = ("checkpoints", "tensorboard")  # the directories a run writes into


def check_workdir(workdir: str, study: bool = False) -> None:
    """The run directory must be (or be creatable as) a writable directory, and not hold the other kind of
    workdir (a study's, for a single run; a single run's, for a study): either would overwrite the other's
    results.json, which KD runs read to find a teacher's selected step. Checked before any compute, without
    creating anything."""
    from transferlab.errors import UserError

    if files.is_storage_url(workdir):
        raise UserError(f"--workdir {workdir!r}: storage URLs are not supported; use a directory every process "
                        "can write, e.g. the bucket mounted with gcsfuse")
    path = os.path.abspath(workdir)
    rerun_of_a_run = _holds_a_run(path)  # (an arm's own run, rerun by hand, is that run)
    ancestor = os.path.dirname(path)
    while ancestor != os.path.dirname(ancestor):  # up to the root
        owned = os.path.relpath(path, ancestor).split(os.sep)[0]
        if _holds_a_run(ancestor):
            if owned in RUN_OWNED_DIRS:
                raise UserError(f"--workdir {workdir!r}: lies inside {os.path.join(ancestor, owned)}, which the run "
                                f"in {ancestor} writes; use a directory outside it")
            raise UserError(f"--workdir {workdir!r}: lies inside the run in {ancestor}; use a directory outside it")
        inside_arm = [] if rerun_of_a_run else arm_runs(ancestor)
        if inside_arm:
            raise UserError(f"--workdir {workdir!r}: lies inside {ancestor}, a study arm's directory (runs in it: "
                            f"{', '.join(inside_arm[:3])}); the study's report would count it as one of that arm's "
                            "seeds: use a directory outside it")
        ancestor = os.path.dirname(ancestor)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"--workdir {workdir!r}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--workdir {workdir!r}: not writable")
        seeds = arm_runs(path)
        if seeds:
            raise UserError(f"--workdir {workdir!r}: is a study arm's directory (runs in it: {', '.join(seeds[:3])}"
                            f"{', ...' if len(seeds) > 3 else ''}); give the study's directory, or a new one")
        single = [n for n in ("checkpoints", "config.json") if os.path.exists(os.path.join(path, n))]
        runs = study_runs(path)
        if study and single:
            raise UserError(f"--workdir {workdir!r}: holds a single run ({single[0]}); a study needs a directory "
                            "of its own")
        if not study and runs:
            more = f", ... ({len(runs)} in all)" if len(runs) > 3 else ""
            raise UserError(f"--workdir {workdir!r}: holds a study (runs under it: {', '.join(runs[:3])}{more}); a "
                            "single run needs a directory of its own")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir!r}: cannot be created ({parent!r} is not a writable directory)")


def arm_runs(directory: str) -> list[str]:
    """The `seed_*` runs a study arm's directory holds (none: not an arm's directory)."""
    return _runs_in(directory, "seed_*")


def study_runs(directory: str) -> list[str]:
    """The `<arm>/seed_*` runs a study's directory holds, relative to it (none: not a study's directory)."""
    return _runs_in(directory, os.path.join("*", "seed_*"))


def _runs_in(directory: str, pattern: str) -> list[str]:
    return sorted(os.path.relpath(d, directory) for d in glob.glob(os.path.join(glob.escape(directory), pattern))
                  if any(os.path.exists(os.path.join(d, n)) for n in RUN_FILES))


def _holds_a_run(directory: str) -> bool:
    """A transferlab run's directory: its config.json (with the versions this library records) beside its
    checkpoints/ or results.json."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            ours = "_versions" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False
    return ours and (os.path.isdir(os.path.join(directory, "checkpoints"))
                     or os.path.isfile(os.path.join(directory, "results.json")))


def _use_compilation_cache(cache_dir: str, workdir: str) -> None:
    """`config.xla_cache_dir` -> JAX's persistent compilation cache (unless $JAX_COMPILATION_CACHE_DIR is
    set: the environment wins). Programs that take over a second to compile are stored and reused, e.g. by
    every seed of a study arm after the first: `make kd-table`'s programs compile once per arm."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    from transferlab.errors import ConfigError
    path = (os.path.normpath(os.path.join(os.path.abspath(workdir), cache_dir))
            if cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR") else None)
    if path:
        run_owned = {os.path.normpath(os.path.join(os.path.abspath(workdir), name)) for name in
                     ("", *RUN_OWNED_DIRS, "config.json", "results.json", "results.md", "metrics.jsonl")}
        if path in run_owned:
            raise ConfigError(f"config key 'xla_cache_dir': {cache_dir!r} is the run's own directory or file; use "
                              "e.g. 'xla_cache'")
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(f"config key 'xla_cache_dir': {path} exists and is not a directory")
        drop_damaged_cache_entries(path)
    if path != _CACHE_SET_BY_US[0] and (path or _CACHE_SET_BY_US[0]):
        # JAX sets its cache up once per process: a later in-process run (a notebook's `main.run`) would
        # keep writing into the first run's cache, or keep using it without `xla_cache_dir`
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
        _CACHE_SET_BY_US[0] = path


_CACHE_SET_BY_US = [None]  # the compilation cache directory `_use_compilation_cache` last set
_CACHE_ENTRY = re.compile(r".+-[0-9a-f]{64}-cache")  # JAX's entry names: '<module>-<sha256 hex>-cache'


def drop_damaged_cache_entries(path: str) -> list:
    """Removes the entries of JAX's compilation cache at `path` that do not decompress; returns their paths.

    JAX writes an entry in place, not through a rename, so a run killed while writing one leaves it truncated;
    JAX then warns about it on every later run and never replaces it. Called before `jax.distributed` starts,
    so no process of a multi-process run is writing yet."""
    try:
        from jax._src.compilation_cache import decompress_executable  # JAX's own codec (zstd or zlib)
    except ImportError:  # a JAX without it: leave the cache alone
        return []
    damaged = []
    for entry in sorted(glob.glob(os.path.join(glob.escape(path), "*-cache"))):
        if not _CACHE_ENTRY.fullmatch(os.path.basename(entry)):  # JAX's own names only: not a user's file
            continue
        try:
            with open(entry, "rb") as f:
                decompress_executable(f.read())
        except OSError:
            continue
        except Exception:  # noqa: BLE001  (zlib.error, zstd.ZstdError, ...: a truncated entry)
            damaged.append(entry)
            with contextlib.suppress(OSError):
                os.remove(entry)
    return damaged


def _quiet_library_warnings() -> None:
    """Orbax and tfds log absl WARNING lines on every read-only checkpoint (a teacher, an init checkpoint)
    and dataset lookup ('Given directory is read only', ...): noise above our own lines, and on bad input
    lines above the one-line error. The CLI keeps absl's errors only."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    absl_logging.get_absl_logger().addFilter(_filter_library_logs)


def _filter_library_logs(record) -> bool:
    """Drops Orbax's logged tracebacks of what the CLI reports in one line itself: a second Ctrl-C arriving
    while Orbax waits for a save ('Save Finalize thread ... failed'), a save that cannot write (disk full);
    a garbled _CHECKPOINT_METADATA, which Orbax logs with its content at each read, becomes one [note]."""
    from transferlab.checkpoint import is_write_failure
    exc = record.exc_info[1] if record.exc_info else None
    if str(record.msg).startswith(_DAMAGED_STEP_METADATA):  # (Orbax logs it, with the file's content, per read)
        path = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        if path not in _NOTED:
            _NOTED.add(path)
            errors.note(f"{path} is damaged; Orbax ignores it (it records only the save time and item handlers)")
        return False
    return not isinstance(exc, KeyboardInterrupt) and not is_write_failure(exc) and \
        not ("raised an exception" in str(record.msg) and is_write_failure(Exception(record.getMessage())))


_DAMAGED_STEP_METADATA = "Failed to json parse Metadata file"
_NOTED: set = set()


def _silence_unraisable() -> None:
    """After a user error, libraries' abandoned background work (e.g. Orbax's read coroutines of an
    unreadable checkpoint) must not print 'Exception ignored in ...' tracebacks below our one line."""
    import gc
    sys.unraisablehook = lambda unraisable: None
    gc.collect()


def main() -> None:
    from transferlab import host_allocator
    try:
        host_allocator.reexec_with_mimalloc()
    except host_allocator.AllocatorChoiceError as e:
        print(f"transferlab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    errors.exit_with(run)


if __name__ == "__main__":
    main()
