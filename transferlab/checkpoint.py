"""Orbax checkpoints: async saves, keep the latest K plus the best on validation, resume, reshard.

A checkpoint holds two items: `state` (the whole train state: params, BN
statistics, optimizer state, step, RNG) and `data` (the data iterator's
position, JSON). Saves are asynchronous and atomic (Orbax writes to a
temporary directory and renames it when complete), so a run killed mid-save
resumes from the previous complete checkpoint. Restores go through an abstract
target whose leaves carry the *current* mesh's shardings, so a checkpoint
written on 8 devices restores onto 2 (or onto another mesh shape).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import json
import os
import sys

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from transferlab import checksum, config as config_lib
from transferlab.errors import UserError, first_line, note


CHECKSUMS = "checksums"  # the data item's key for the state's array checksums (transferlab/checksum.py)


def _metric_fn(metrics) -> float:
    """A checkpoint's validation score for `BestN`; -inf for one saved between evaluations."""
    return float(metrics["selection_metric"]) if metrics and "selection_metric" in metrics else float("-inf")


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
    """A RuntimeError('Event loop is closed') raised inside asyncio itself."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed" or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.join("asyncio", "base_events.py") in tb.tb_frame.f_code.co_filename


def _ignore_closed_loop_callbacks() -> None:
    """After a failed read, TensorStore's I/O threads can still finish reads and post their results to the
    asyncio loop Orbax has already closed; the RuntimeError('Event loop is closed') that follows is reported
    from a thread with no Python caller, as a bare traceback printed above our one-line error. These hooks
    (`sys.unraisablehook`, and `sys.excepthook` for good measure) drop exactly that error and pass
    everything else to the previous hooks. Installed once, by the first Checkpointer."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if getattr(previous_unraisable, "ignores_closed_loop_callbacks", False):
        return

    def unraisable_hook(args):
        if not _is_closed_loop_callback(args.exc_type, args.exc_value, args.exc_traceback):
            previous_unraisable(args)

    def except_hook(exc_type, exc, tb):
        if not _is_closed_loop_callback(exc_type, exc, tb):
            previous_except(exc_type, exc, tb)

    unraisable_hook.ignores_closed_loop_callbacks = except_hook.ignores_closed_loop_callbacks = True
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


class ModelMismatch(UserError):
    """A checkpoint's params or BN statistics (`key`: 'model', 'peer1', ...) have other shapes than the
    configured model's."""

    def __init__(self, message: str, key: str = "model"):
        super().__init__(message)
        self.key = key


def _unreadable_metrics(directory: str) -> str | None:
    """The first step's `metrics/metrics` file under `directory` that is not a JSON object whose
    `selection_metric`, if any, is a number (Orbax reads them all when it opens the directory, and ranks the
    steps by that score at each save), or None."""
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*", "metrics", "metrics"))):
        try:
            with open(path, encoding="utf-8") as f:
                metrics = json.load(f)
        except (OSError, ValueError):
            return path
        score = metrics.get("selection_metric", 0.0) if isinstance(metrics, dict) else None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return path
    return None


class Checkpointer:
    """Wraps one `ocp.CheckpointManager` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_metric_fn, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each step's metrics to disk: without it `BestN` ranks only the
        # saves of this process, `metrics(step)` is None, and a restart forgets (and deletes) the best.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_metric_fn, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except Exception as e:  # noqa: BLE001  (e.g. a step's metrics/metrics file garbled: JSONDecodeError)
            damaged = _unreadable_metrics(self.directory)
            which = (f"{damaged} is damaged: move that step's directory ({os.path.dirname(os.path.dirname(damaged))})"
                     " away" if damaged else "a step's metadata is damaged: move that step's directory away")
            raise UserError(f"checkpoints in {self.directory} cannot be read ({first_line(e, innermost=True)}); "
                            f"{which}") from None
        damaged = _unreadable_metrics(self.directory)  # JSON, but a score Orbax fails on at the next save
        if damaged:
            self.manager.close()
            raise UserError(f"checkpoints in {self.directory} cannot be read ({damaged}: its selection_metric is "
                            f"not a number); move that step's directory "
                            f"({os.path.dirname(os.path.dirname(damaged))}) away")
        _ignore_closed_loop_callbacks()  # before anything is read (metadata reads fail the same way)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest saved validation `selection_metric`, if any."""
        scored = [(s, self.manager.metrics(s)) for s in self.manager.all_steps()]
        scored = [(_metric_fn(m), s) for s, m in scored if m and "selection_metric" in m]
        return max(scored)[1] if scored else None

    def save(self, step: int, state, data_state, selection_metric: float | None = None) -> None:
        metrics = {} if selection_metric is None else {"selection_metric": float(selection_metric)}
        data_state = {**data_state, CHECKSUMS: checksum.digests(state)}  # (verified at restore)
        with self._writing():  # (an async save's failure surfaces at the next save or wait)
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), metrics=metrics)

    @contextlib.contextmanager
    def _writing(self):
        """A save that cannot write (disk full, quota, a read-only or vanished directory) is one line: the
        checkpoints already complete stay valid, and rerunning resumes from the latest of them."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (only write failures are translated; the rest propagates)
            if not is_write_failure(e):
                raise
            raise UserError(f"checkpoints in {self.directory} cannot be written ({first_line(e, innermost=True)}); "
                            "the complete checkpoints are kept: free space (or fix the directory) and rerun the "
                            "same command to resume from the latest") from None

    def _check_compatible(self, step: int, abstract_state) -> None:
        """A clear error before Orbax reads anything if the saved arrays differ from the target's."""
        metadata = self._state_metadata(step)
        metadata = getattr(metadata, "tree", metadata)
        is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        saved = collections.Counter(tuple(m.shape) for m in jax.tree.leaves(metadata, is_leaf=is_array)
                                    if is_array(m))
        wanted = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(abstract_state))
        if not saved:  # e.g. state/_METADATA missing: a damaged checkpoint, not another model
            raise self._unreadable(step, RuntimeError("its state metadata lists no arrays (state/_METADATA "
                                                      "missing or damaged)"))
        if saved != wanted:
            extra, missing = saved - wanted, wanted - saved
            raise UserError(f"checkpoint {self.directory}/{step} does not match this config (model or optimizer "
                            f"changed?): saved arrays of shapes {sorted(extra)[:3]} where this config expects "
                            f"{sorted(missing)[:3]}; use a new --workdir for a different model")

    def restore(self, step: int, abstract_state):
        """Restores (state, data_state) at `step` onto the shardings carried by `abstract_state`."""
        self._check_compatible(step, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise plain Exceptions on unreadable data)
            raise self._unreadable(step, e) from e
        data = restored["data"]
        saved = data.pop(CHECKSUMS, None) if isinstance(data, dict) else None
        self._verify(step, restored["state"], saved)
        return restored["state"], data

    def _verify(self, step: int, state, saved, resuming: bool = True) -> None:
        """The restored arrays against the checksums saved with them (checkpoints older than 2026-11-28 have
        none): bytes damaged on disk after the save are an error, not a silently different run."""
        damaged = checksum.first_mismatch(state, saved)
        if damaged:
            raise self._unreadable(step, RuntimeError(f"its array {damaged} does not match the checksum saved "
                                                      "with it (its files were damaged after the save)"), resuming)

    def _state_metadata(self, step: int, resuming: bool = True):
        """The saved train state's metadata tree at `step`; unreadable -> the one-line UserError."""
        try:
            return self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001  (as in restore)
            raise self._unreadable(step, e, resuming) from e

    def _unreadable(self, step: int, error: Exception, resuming: bool = True) -> UserError:
        """A one-line error for a checkpoint that cannot be restored: resuming this run, naming the earlier
        steps; read from another run (a teacher, an init checkpoint, an export), what to do about that run."""
        earlier = [s for s in self.manager.all_steps() if s < step]
        if not resuming:
            hint = "; that run's files are damaged: restore them from a copy, or train that run again"
        else:
            hint = (f"; to resume from step {max(earlier)} instead, move {self.directory}/{step} away" if earlier
                    else "")
        return UserError(f"checkpoint {self.directory}/{step} cannot be restored (corrupted, or the model or "
                         f"optimizer changed): {first_line(error, innermost=True)}{hint}")

    def restore_subtree(self, step: int, abstract_subtree: dict, optional=(), read: bool = True):
        """Restores the parts of the saved train state named two levels deep in `abstract_subtree`
        (`{'params': {'model': ...}, 'model_state': {'model': ...}}`: a model's params and BN statistics)
        onto its shardings; the rest (optimizer state, connectors) is read replicated and dropped. Second-level
        names in `optional` (a DML run's peers) that the checkpoint lacks are left out of the result.
        With `read=False`, only the saved shapes are checked against `abstract_subtree` (metadata alone) and
        None is returned."""
        metadata = self._state_metadata(step, resuming=False)
        metadata = getattr(metadata, "tree", metadata)
        if not isinstance(metadata, dict) or not metadata:  # (not another task's checkpoint: a damaged one)
            raise self._unreadable(step, RuntimeError("its state metadata lists no arrays (state/_METADATA "
                                                      "missing or damaged)"), resuming=False)
        abstract_subtree = {top: {name: value for name, value in part.items()
                                  if name not in optional or name in (metadata.get(top) or {})}
                            for top, part in abstract_subtree.items()}
        sharding = jax.tree.leaves(abstract_subtree)[0].sharding
        is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata,
                              is_leaf=is_array)
        _graft(target, abstract_subtree, f"checkpoint {self.directory}/{step}")
        if not read:
            return None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001  (as in restore)
            raise self._unreadable(step, e, resuming=False) from e
        self._verify(step, restored["state"], (self._data(step) or {}).get(CHECKSUMS), resuming=False)
        return _prune(restored["state"], abstract_subtree)

    def saved_config(self, step: int) -> dict | None:
        """The resolved config saved with the checkpoint at `step` (None for checkpoints written before
        2026-11-27 09:00, which hold the data-iterator state only, or when it cannot be read)."""
        config = (self._data(step) or {}).get("config")
        return config if isinstance(config, dict) else None

    def _data(self, step: int) -> dict | None:
        """The JSON item saved beside the state at `step` (iterator, clock, config, checksums), or None."""
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except Exception:  # noqa: BLE001  (unreadable: `restore` reports it with the one-line error)
            return None
        return data if isinstance(data, dict) else None

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self.manager.close()


_WRITE_FAILURES = ("RESOURCE_EXHAUSTED", "No space left", "Disk quota exceeded", "Read-only file system",
                   "Error writing", "Failed writing")


def is_write_failure(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it chains) is Orbax/TensorStore failing to write a checkpoint's files."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return True
        if any(marker in str(exc) for marker in _WRITE_FAILURES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def restore_selected_subtree(workdir: str, abstract_subtree: dict, where: str, error=UserError, optional=(),
                             read: bool = True):
    """(restored `abstract_subtree`, step) from the checkpoint the run in `workdir` selected
    (its results.json), else its latest: a model's params and BN statistics for a teacher,
    an init checkpoint or an export. `where` (a config key or flag) leads every one-line error.
    `read=False` checks the same from the checkpoint's metadata alone, reading no array, and gives
    (None, step), or (None, None) for a run without a complete checkpoint yet: a study checks its arms'
    existing teachers this way before anything trains."""
    from transferlab.tasks.kd import selected_step
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise error(f"{where}: no checkpoints in {workdir!r} (expected {ckpt_dir}){_runs_below(workdir)}")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = selected_step(workdir, ckpt)
        if step is None and not read:  # (a study's teacher arm killed before its first save trains again first)
            return None, None
        if step is None:
            raise error(f"{where}: {ckpt_dir} holds no complete checkpoint")
        if read and not os.path.exists(os.path.join(workdir, "results.json")):
            note(f"{where}: {workdir} has not finished (no results.json); using its latest checkpoint, step {step}")
        try:
            return ckpt.restore_subtree(step, abstract_subtree, optional, read), step
        except ModelMismatch as e:
            raise error(f"{where}: {e}{_trained_as(workdir, e.key)}") from None
        except UserError as e:
            raise error(f"{where}: {e}") from None
    finally:
        ckpt.close()


def config_json(run_dir: str) -> dict | None:
    """`run_dir/config.json` if it reads as a JSON object, else None."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _runs_below(directory: str) -> str:
    """'; runs under it: teacher/seed_0, ...' for a study directory given where one run is expected."""
    found = sorted(os.path.relpath(os.path.dirname(p), directory)
                   for pattern in ("*/checkpoints", "*/*/checkpoints")
                   for p in glob.glob(os.path.join(glob.escape(directory), pattern)) if os.path.isdir(p))
    if not found:
        return ""
    more = f", ... ({len(found)} in all)" if len(found) > 4 else ""
    return f"; runs under it: {', '.join(found[:4])}{more}"


def _trained_as(run_dir: str, key: str = "model") -> str:
    """'; that run trained mlp {'hidden_sizes': [256]} on mnist5k' from its saved config ('' if unknown);
    for `key` 'peer<k>', a DML run's student k ('; that run's peer1 was ...')."""
    saved = saved_config(run_dir) or {}
    dataset = saved.get("dataset")
    try:
        model = student_model(saved, key)
    except (TypeError, ValueError, IndexError, AttributeError):
        return ""
    if not isinstance(model, dict) or not isinstance(dataset, dict):
        return ""
    kwargs = f" {model['kwargs']}" if model.get("kwargs") else ""
    whose = "that run trained" if key == "model" else f"that run's {key} was"
    return f"; {whose} {model.get('name')}{kwargs} on {dataset.get('name')}"


def student_model(saved: dict, key: str = "model") -> dict:
    """The model section of the student whose params are `params[key]` in a run started with `saved` (its
    config.json): 'model', or a DML run's 'peer<k>' (`dml.peers[k-1]`; a peer the config does not list, or
    one naming no model, is `model` with that peer's own dtype/kwargs)."""
    model = dict(saved.get("model") or {})
    if key == "model":
        return model
    k = int(key[len("peer"):])
    peers = list((saved.get("dml") or {}).get("peers") or ())
    if k > len(peers):
        return model
    peer = dict(peers[k - 1])
    return {**model, "kwargs": {} if "name" in peer else model.get("kwargs", {}), **peer}


def saved_config(run_dir: str) -> dict | None:
    """The config a run in `run_dir` was started with: its config.json, else (deleted or garbled) the copy
    in its latest checkpoint; None if neither can be read."""
    saved = config_json(run_dir)
    if saved is not None:
        return saved
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return None
    try:
        ckpt = Checkpointer(run_dir, read_only=True)
    except UserError:
        return None
    try:
        step = ckpt.latest_step()
        return None if step is None else ckpt.saved_config(step)
    finally:
        ckpt.close()


def note_source_data(where: str, run_dir: str, config) -> None:
    """One line when the run in `run_dir` (a teacher, an init checkpoint) was trained on another dataset than
    `config`'s (legitimate for transfer between datasets with the same classes, but more often a wrong path),
    or on examples of `config`'s eval or test split: this run's scores there are then partly on examples the
    knowledge it is given was learned from."""
    from transferlab import data

    saved = saved_config(run_dir) or {}
    dataset = saved.get("dataset") if isinstance(saved.get("dataset"), dict) else {}
    name, train_split = dataset.get("name"), dataset.get("train_split")
    if not isinstance(name, str):
        return
    if name != config.dataset.name:
        note(f"{where}: {run_dir} was trained on {name!r}, this run is on {config.dataset.name!r}")
        return
    for key in ("eval_split", "test_split"):
        split = config.dataset[key]
        try:
            shared = split and isinstance(train_split, str) and data.shared_examples(
                name, train_split, split, config.dataset.data_dir or None)
        except Exception:  # noqa: BLE001 (a split this run cannot resolve is reported where it reads it)
            shared = 0
        if shared:
            note(f"{where}: {run_dir} was trained on {train_split!r}, which shares {shared} examples with this "
                 f"run's dataset.{key} {split!r}: its scores there are partly on examples that run learned from")


def config_difference(run_dir: str, config) -> str | None:
    """'key: saved A, now B' if the run in `run_dir` was started with a config other than `config`
    (see `config.first_difference`); None if it was not, or if nothing saved says."""
    saved = saved_config(run_dir)
    return None if saved is None else config_lib.first_difference(saved, config, run_dir)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying concrete `NamedSharding`s (what a reshard restore needs)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)



def _graft(target: dict, wanted: dict, where: str, depth: int = 2, path: str = "") -> None:
    """Puts `wanted`'s subtrees at `depth` (e.g. params/model) into `target` in place, checking the
    saved shapes match; everything else in `target` stays a replicated placeholder read."""
    for key, value in wanted.items():
        saved = target.get(key) if isinstance(target, dict) else None
        if saved is None:
            raise UserError(f"{where} has no {path + key!r} (saved by a different task or model?)")
        if depth > 1:
            _graft(saved, value, where, depth - 1, path + key + "/")
            continue
        saved_shapes = [(p, x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]]
        wanted_shapes = [(p, x.shape) for p, x in jax.tree_util.tree_flatten_with_path(value)[0]]
        if saved_shapes != wanted_shapes:
            raise ModelMismatch(f"{where}: its {path + key!r} do not match the configured model "
                                f"(different architecture, number of classes or input size?)", key)
        target[key] = value


def _prune(tree, wanted, depth: int = 2):
    """The parts of `tree` named by `wanted` down to `depth`."""
    if depth == 0:
        return tree
    return {k: _prune(tree[k], v, depth - 1) for k, v in wanted.items()}
