"""The one training loop every task shares: `train_and_evaluate(config, workdir)`.

A task supplies `init_params`, `load_frozen`, `loss_fn` and `eval_fn`; this
module owns everything else: the mesh, sharded init (`jax.eval_shape` ->
shardings -> `jax.jit(init, out_shardings=...)`), the jitted train step with
explicit in/out shardings and state donation, gradient accumulation over
micro-batches, on-device augmentation, evaluation that counts every example
once, metrics, Orbax checkpoints with exact resume, model selection on the
validation split, SIGTERM handling and the NaN guard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import transferlab
from transferlab import checkpoint, config as config_lib, data, files, parallel, preemption, provenance
from transferlab.data import augment
from transferlab.errors import ConfigError, NonFiniteLoss, UserError, note
from transferlab.metrics import MetricWriter
from transferlab.optim import make_optimizer
from transferlab.tasks import create_task


def _fault_hook(name: str, form: str) -> list[int]:
    """A testing hook's integers from $`name` (`form`: 'S' or 'S:P'); zeros when unset."""
    raw = os.environ.get(name, "")
    fields = form.count(":") + 1
    try:
        values = [int(x) for x in raw.split(":")] if raw else [0] * fields
    except ValueError:
        values = []
    if len(values) != fields:
        raise UserError(f"${name}={raw!r}: expected {form} (integers; a testing hook)")
    return values


# Testing hook: SIGKILL this process right after the given step (as a crash or a pod eviction would).
(_FAULT_KILL_AT_STEP,) = _fault_hook("TRANSFERLAB_FAULT_KILL_AT_STEP", "STEP")
# Testing hook: process P sends itself SIGTERM right after step S ('S:P'), as one host's preemption notice.
_FAULT_TERM_AT_STEP, _FAULT_TERM_PROCESS = _fault_hook("TRANSFERLAB_FAULT_TERM_AT", "STEP:PROCESS")


class Trainer:
    """Builds the compiled pieces of one run; `run()` trains, evaluates and writes results."""

    def __init__(self, config, workdir: str, devices=None, info=None):
        config_lib.validate(config)  # (a config built in Python from defaults() has not been)
        self.config = config
        self.workdir = workdir
        self.mesh = parallel.make_mesh(config.mesh_shape, devices)
        parallel.batch_size_per_device_check(self.mesh, config.batch_size)
        self.eval_batch_size = config.eval_batch_size or config.batch_size
        parallel.batch_size_per_device_check(self.mesh, self.eval_batch_size, "eval_batch_size")
        if config.batch_size % config.optimizer.accumulate_steps:
            raise ConfigError(f"config key 'optimizer.accumulate_steps': {config.optimizer.accumulate_steps} "
                              f"does not divide batch_size {config.batch_size}")
        self.data_dir = config.dataset.data_dir or None
        # `info` (num_classes, image_shape, split_sizes) may be given to build steps without data (benchmarks).
        self.info = info or data.dataset_info(config.dataset.name, self.data_dir)
        num_train = self.info.split_sizes.get(config.dataset.train_split, 0)
        self.split_notes = []  # said when the run starts: scores partly on training examples
        for key in ("train_split", "eval_split", "test_split"):  # names, slices ('train[:90%]') or sums
            split = config.dataset[key]
            if not split or info is not None:
                continue
            try:
                size = data.split_size(config.dataset.name, split, self.data_dir)
            except ConfigError as e:
                raise ConfigError(f"config key 'dataset.{key}': {e}") from None
            if key == "train_split":
                num_train = size
            elif shared := data.shared_examples(config.dataset.name, config.dataset.train_split, split,
                                                self.data_dir):
                self.split_notes.append(f"dataset.{key} {split!r} shares {shared} examples with dataset.train_split "
                                        f"{config.dataset.train_split!r}: its scores are partly on training examples")
        if (config.selection == "best" and info is None and config.dataset.eval_split and config.dataset.test_split
                and (shared := data.shared_examples(config.dataset.name, config.dataset.eval_split,
                                                    config.dataset.test_split, self.data_dir))):
            raise ConfigError(f"config key 'dataset.eval_split': {config.dataset.eval_split!r} shares {shared} examples "
                              f"with dataset.test_split {config.dataset.test_split!r}, and selection='best' would "
                              "select the model on test data; use a validation split")
        self.task = create_task(config, self.info.num_classes, num_train)
        self.abstract_images = jax.ShapeDtypeStruct((2, *self.info.image_shape), jnp.float32)

        abstract_params, abstract_model_state = jax.eval_shape(self._init_params, jax.random.key(0))
        self.tx, self.schedule = make_optimizer(config, abstract_params)
        # the models' init is traced once: the state is built around the abstract variables above
        self.abstract_state = jax.eval_shape(self._init_state, jnp.uint32(config.seed),
                                             (abstract_params, abstract_model_state))
        self.state_shardings = parallel.tree_shardings(self.mesh, self.abstract_state, config.sharding_rules)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)

    # ------------------------------------------------------------------ state

    def _init_params(self, rng):
        return self.task.init_params(rng, jnp.zeros(self.abstract_images.shape, jnp.float32))

    def _init_state(self, seed, variables=None):
        """The train state for `seed`; `variables` = (params, model_state) if already initialised."""
        rng = jax.random.PRNGKey(seed)
        init_rng, train_rng = jax.random.split(rng)
        params, model_state = self._init_params(init_rng) if variables is None else variables
        return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                "opt_state": self.tx.init(params), "rng": train_rng}

    def init_state(self):
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(jnp.uint32(self.config.seed))

    # ------------------------------------------------------------------ steps

    def _grads(self, params, model_state, frozen, batch, rng, step):
        """Loss gradients, averaged over `accumulate_steps` sequential micro-batches."""
        k = self.config.optimizer.accumulate_steps
        grad_fn = jax.grad(self.task.loss_fn, has_aux=True)
        if k == 1:
            grads, (model_state, metrics) = grad_fn(params, model_state, frozen, batch, rng, step)
            return grads, model_state, metrics
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(carry, inputs):
            grads_acc, state = carry
            index, mb = inputs
            g, (state, m) = grad_fn(params, state, frozen, mb, jax.random.fold_in(rng, index), step)
            return (jax.tree.map(jnp.add, grads_acc, g), state), m

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, model_state), metrics = jax.lax.scan(body, (zeros, model_state), (jnp.arange(k), micro))
        return jax.tree.map(lambda g: g / k, grads), model_state, jax.tree.map(jnp.mean, metrics)

    def train_step(self, state, frozen, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        aug_rng, loss_rng = jax.random.split(rng)
        if getattr(self.task, "replays_views", False):  # a teacher cache of replayable views: the task's own
            batch = self.task.replay_augment(aug_rng, batch)
        else:
            batch = augment.apply(aug_rng, batch, {**self.config.augment, "num_classes": self.info.num_classes})
        grads, model_state, metrics = self._grads(state["params"], state["model_state"], frozen, batch,
                                                  loss_rng, step)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "learning_rate": self.schedule(step), "grad_norm": optax.tree.norm(grads)}
        new_state = {"step": step + 1, "params": params, "model_state": model_state, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    def _abstract_batch(self, n: int) -> dict:
        """The shapes of a batch of `n` examples as the data pipeline yields them (train batches)."""
        return {"image": jax.ShapeDtypeStruct((n, *self.info.image_shape), jnp.float32),
                "label": jax.ShapeDtypeStruct((n,), jnp.int32), "index": jax.ShapeDtypeStruct((n,), jnp.int32)}

    def trace_train_step(self) -> None:
        """Traces one train step on abstract values, without data, checkpoints or compute: a loss's own shape
        checks raise here (ConfigError naming the term)."""
        jax.eval_shape(self.train_step, self.abstract_state, self.task.abstract_frozen(self.abstract_images),
                       self._abstract_batch(self.config.batch_size))

    def eval_step(self, state, frozen, batch):
        return self.task.eval_fn(state["params"], state["model_state"], frozen, batch)

    def compile(self, frozen):
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        self.jit_train_step = jax.jit(
            self.train_step, in_shardings=(self.state_shardings, frozen_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        self.jit_eval_step = jax.jit(
            self.eval_step, in_shardings=(self.state_shardings, frozen_shardings, self.batch_sharding),
            out_shardings=self.replicated)
        self._check_selection_metric(frozen)

    def _check_selection_metric(self, frozen) -> None:
        """`selection_metric` must be one of this task's eval metrics: found by tracing the eval step (no
        compute), not at the first evaluation, which with eval_every_steps=0 is after all the training."""
        n = self.eval_batch_size
        batch = {**self._abstract_batch(n), "mask": jax.ShapeDtypeStruct((n,), jnp.bool_)}  # (eval batches)
        names = jax.eval_shape(self.eval_step, self.abstract_state, frozen, batch)
        if self.config.selection_metric not in names:
            available = [k for k in sorted(names) if re.fullmatch(config_lib.SELECTION_METRICS, k)]
            raise ConfigError(f"config key 'selection_metric': {self.config.selection_metric!r} is not an eval "
                              f"metric of task {self.config.task!r}; available: {', '.join(available)}")

    # ------------------------------------------------------------------ data

    def train_iterator(self):
        return data.train_iterator(
            self.config.dataset.name, self.config.dataset.train_split, self.config.batch_size, self.config.seed,
            data_dir=self.data_dir, process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=self.config.dataset.worker_count)

    def evaluate(self, state, frozen, split: str) -> dict:
        """Metrics over every example of `split` exactly once (padded last batch masked out)."""
        totals = None
        for local in data.eval_batches(self.config.dataset.name, split, self.eval_batch_size,
                                       data_dir=self.data_dir, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
            sums = self.jit_eval_step(state, frozen, parallel.global_batch(self.mesh, local))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = float(totals.pop("count"))
        out = {k: float(v) / count for k, v in totals.items()}
        out["count"] = int(count)
        return out

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        config, workdir = self.config, self.workdir
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise UserError(f"workdir {workdir!r}: cannot create it ({e.strerror})") from None
        ckpt_dir = os.path.join(workdir, "checkpoints")  # (Orbax would fail only when it saves, after minutes)
        if os.path.exists(ckpt_dir) and not (os.path.isdir(ckpt_dir) and os.access(ckpt_dir, os.W_OK | os.X_OK)):
            raise UserError(f"workdir {workdir!r}: {ckpt_dir} is not a writable directory")
        for name, is_kind, kind in (("config.json", os.path.isfile, "file"),
                                    ("metrics.jsonl", os.path.isfile, "file"),
                                    ("results.json", os.path.isfile, "file"),
                                    ("tensorboard", os.path.isdir, "directory")):
            path = os.path.join(workdir, name)  # (found now, not after the training)
            if os.path.lexists(path) and not is_kind(path):
                raise UserError(f"workdir {workdir!r}: {path} is not a {kind}; move it away")
        finished = self._finished_results()
        if finished is not None:
            return finished
        for message in self.split_notes:
            note(message)
        self._clock = [time.time(), 0.0]  # this process's start, and the time earlier processes spent on the run
        self._plain_config = json.loads(json.dumps(config_lib.to_plain(config), default=str))  # saved in checkpoints
        self._plain_config.update(run_location(workdir))  # (as config.json's)
        # A loss's shape errors (taps it cannot compare) are found by tracing the step, before anything is
        # written to the workdir and before a teacher cache or class means (minutes of work) are computed.
        if getattr(self.task, "frozen_reads_data", False) or getattr(self.task, "terms", None):
            self.trace_train_step()
        frozen = self.task.load_frozen(self.mesh, self.abstract_images)
        self.compile(frozen)
        ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
        writer = None
        try:
            train_iter = self.train_iterator()
            latest = ckpt.latest_step()
            if latest is None:
                state = self.init_state()
                if config.init_checkpoint:
                    state = self.load_init_checkpoint(state)
                start = 0
            else:  # resume; an incompatible checkpoint raises here, before anything in workdir changes
                # config.json, and the copy in the checkpoint itself (it survives a deleted config.json)
                changed = [difference for saved in (checkpoint.config_json(workdir), ckpt.saved_config(latest))
                           if saved is not None and (difference := config_lib.first_difference(saved, config,
                                                                                               workdir))]
                if changed:
                    raise UserError(f"--workdir {workdir!r} holds a run started with a different config "
                                    f"({changed[0]}); rerun it with its own config, or use a new --workdir")
                abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_shardings)
                state, data_state = ckpt.restore(latest, abstract)
                if int(state["step"]) != latest:  # a step directory copied or renamed by hand
                    raise UserError(f"checkpoint {ckpt.directory}/{latest} holds the state of step "
                                    f"{int(state['step'])}; move that directory away to resume from an earlier one")
                self._check_frozen_sources(workdir, data_state)
                try:
                    if isinstance(data_state, dict) and {"iterator", "elapsed_s"} <= set(data_state):
                        self._clock[1] = float(data_state["elapsed_s"])
                        data_state = data_state["iterator"]  # (checkpoints before 2026-11-27: the iterator alone)
                    train_iter.set_state(data_state)
                except (KeyError, TypeError, ValueError, IndexError) as e:
                    raise UserError(f"checkpoint {ckpt.directory}/{latest}: its data-iterator state is damaged "
                                    f"({type(e).__name__}: {e}); move that step's directory away to resume from "
                                    "an earlier one") from None
                start = int(latest)
            write_config(config, workdir)
            writer = MetricWriter(workdir, config.total_steps, start_step=start if latest is not None else -1)
            if latest is not None:
                writer.write(start, {"event": "resumed"})
            with preemption.handling_signals() as stop:
                state = self._loop(state, frozen, train_iter, ckpt, writer, start, stop)
            if stop.raised:
                ckpt.wait()
                return {"preempted_at_step": int(state["step"]), "signal": stop.name}
            return self._finish(state, frozen, ckpt, writer, self._elapsed())
        finally:
            ckpt.wait()
            ckpt.close()
            if writer is not None:
                writer.close()

    def _frozen_sources(self) -> dict:
        """{teacher checkpoint dir: the step restored from it} (what the task's frozen inputs came from)."""
        return dict(getattr(self.task, "frozen_sources", {}))

    def _check_frozen_sources(self, workdir: str, data_state) -> None:
        """A resume must distil from the teacher checkpoints the run started with: an unfinished teacher
        that has since finished, or was trained further, would otherwise swap teachers mid-run."""
        saved = data_state.get("frozen_sources") if isinstance(data_state, dict) else None
        if not isinstance(saved, dict):
            return  # (checkpoints written before 2026-11-27 10:00 do not record it)
        saved = {os.path.abspath(k): v for k, v in saved.items()}  # (recorded as typed before 2026-11-27 15:00)
        for source, step in self._frozen_sources().items():
            if source in saved and saved[source] != step:
                raise UserError(f"--workdir {workdir!r}: this run started from step {saved[source]} of teacher "
                                f"{source}, which now gives step {step} (it finished, or trained further, since); "
                                "use a new --workdir to distil from it now")

    def _elapsed(self) -> float:
        """Seconds spent on this run so far, over every process that worked on it (saved in checkpoints)."""
        return self._clock[1] + time.time() - self._clock[0]

    def _finished_results(self) -> dict | None:
        """The saved results of a run that already finished in this workdir (its config unchanged): a rerun
        neither trains, re-evaluates nor rewrites anything."""
        path = os.path.join(self.workdir, "results.json")
        if not os.path.exists(path):
            return None
        changed = checkpoint.config_difference(self.workdir, self.config)
        if changed:
            raise UserError(f"--workdir {self.workdir!r} holds a run finished with a different config ({changed}); "
                            "use a new --workdir")
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError):
            return None  # unreadable: evaluate again and rewrite it
        from transferlab import report
        try:  # (and so is one that lacks what the summary line and the study's table read)
            report.check_results(path, results if isinstance(results, dict) else {})
        except UserError:
            return None
        return results if isinstance(results.get("selected_step"), int) else None

    def _model_names(self) -> list:
        return list(getattr(self.task, "names", ["model"]))  # DML: ['model', 'peer1', ...]

    def _restore_init_models(self, state, read: bool = True):
        """The models' params and BN statistics of the run in `init_checkpoint` (`read=False`: only checked
        against `state`'s shapes, from the checkpoint's metadata). `state` may be abstract."""
        names = self._model_names()
        part = {"params": {n: state["params"][n] for n in names},
                "model_state": {n: state["model_state"][n] for n in names}}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), part)
        return checkpoint.restore_selected_subtree(self.config.init_checkpoint, abstract,
                                                   "config key 'init_checkpoint'", ConfigError,
                                                   optional=names[1:], read=read)[0]

    def check_checkpoint_inputs(self) -> None:
        """The checkpoints this run reads that exist already (teachers, `init_checkpoint`) match its models,
        checked on their metadata alone: a study checks every arm so before anything trains. Not with several
        processes: Orbax's reads are collectives there, and whether a study's teacher arm has made its
        directory yet can differ between processes (the restore itself still checks, on all together)."""
        if jax.process_count() > 1:
            return
        if hasattr(self.task, "check_checkpoints"):
            self.task.check_checkpoints(self.mesh, self.abstract_images)
        if self.config.init_checkpoint and os.path.isdir(os.path.join(self.config.init_checkpoint, "checkpoints")):
            self._restore_init_models(checkpoint.abstract_with_shardings(self.abstract_state, self.state_shardings),
                                      read=False)

    def load_init_checkpoint(self, state):
        """Replaces the model's params and BN statistics with those of the run in `init_checkpoint`; a DML
        run's peers too, where that run has them (a DML run's own), else they keep their fresh init."""
        restored = self._restore_init_models(state)
        checkpoint.note_source_data("init_checkpoint", self.config.init_checkpoint, self.config)
        fresh = [n for n in self._model_names() if n not in restored["params"]]
        if fresh:
            note(f"init_checkpoint: {self.config.init_checkpoint} has no {', '.join(fresh)}; they start from "
                 "their fresh init")
        state = {**state, "params": {**state["params"], **restored["params"]},
                 "model_state": {**state["model_state"], **restored["model_state"]}}
        if "ema" in state["model_state"]:
            state["model_state"]["ema"] = {"params": restored["params"]["model"],
                                           "model_state": restored["model_state"]["model"]}
        return state

    def _loop(self, state, frozen, train_iter, ckpt, writer, start, stop):
        config = self.config
        last_log_time, last_log_step = time.time(), start
        pending = None  # (step, metrics) of the previous step: read after dispatching the next one
        for step in range(start + 1, config.total_steps + 1):
            batch = parallel.global_batch(self.mesh, next(train_iter))
            state, metrics = self.jit_train_step(state, frozen, batch)
            if pending is not None:
                self._check_finite(*pending, ckpt)
            pending = (step, metrics)
            writer.advance(step)
            last = step == config.total_steps
            if step % config.log_every_steps == 0 or last:
                self._check_finite(step, metrics, ckpt)
                now = time.time()
                rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                writer.write(step, {**jax.device_get(metrics), "steps_per_sec": rate,
                                    "examples_per_sec": rate * config.batch_size})
                last_log_time, last_log_step = now, step
            selection_metric = None
            if (config.eval_every_steps and step % config.eval_every_steps == 0) or last:
                evals = self.evaluate(state, frozen, config.dataset.eval_split)
                writer.write(step, {f"eval/{k}": v for k, v in evals.items()})
                selection_metric = evals[config.selection_metric]  # present: checked by compile()
            stopping = stop.should_stop()
            save_now = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
            save_now = save_now or last or stopping or (selection_metric is not None and config.selection == "best")
            if save_now:
                self._check_finite(step, metrics, ckpt)
                ckpt.save(step, state, {"iterator": train_iter.get_state(), "elapsed_s": self._elapsed(),
                                        "config": self._plain_config, "frozen_sources": self._frozen_sources()},
                          selection_metric)
                writer.flush()
            if stopping:
                writer.write(step, {"event": f"stopped ({stop.name}): checkpoint saved"})
                break
            if step == _FAULT_KILL_AT_STEP:  # fault injection for the kill-and-resume test
                os.kill(os.getpid(), signal.SIGKILL)
            if step == _FAULT_TERM_AT_STEP and jax.process_index() == _FAULT_TERM_PROCESS:  # (multi-process test)
                os.kill(os.getpid(), signal.SIGTERM)
        return state

    def _check_finite(self, step, metrics, ckpt):
        loss = float(jax.device_get(metrics["loss/total"] if "loss/total" in metrics else metrics["loss/ce"]))
        if not np.isfinite(loss):
            ckpt.wait()
            latest = ckpt.latest_step()
            kept = (f"the last good checkpoint (step {latest}) in {ckpt.directory} is kept" if latest is not None
                    else "no checkpoint had been written yet")
            raise NonFiniteLoss(f"non-finite loss {loss} at step {step}; stopped, {kept}")

    def _finish(self, state, frozen, ckpt, writer, wall_time) -> dict:
        config = self.config
        ckpt.wait()
        selected_step = config.total_steps
        if config.selection == "best":
            selected_step = ckpt.best_step() or config.total_steps
            if selected_step != int(state["step"]):
                abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_shardings)
                state, _ = ckpt.restore(selected_step, abstract)
        validation = self.evaluate(state, frozen, config.dataset.eval_split)
        test = self.evaluate(state, frozen, config.dataset.test_split) if config.dataset.test_split else {}
        writer.write(selected_step, {**{f"final/validation/{k}": v for k, v in validation.items()},
                                     **{f"final/test/{k}": v for k, v in test.items()}})
        results = {
            "task": config.task, "model": config.model.name, "dataset": config.dataset.name,
            "seed": config.seed, "total_steps": config.total_steps,
            "selection": "last step" if config.selection == "last"
            else f"best validation {config.selection_metric} ({config.dataset.eval_split} split)",
            "selected_step": int(selected_step),
            **({"teachers": teachers} if (teachers := self._frozen_sources()) else {}),
            "validation": validation, "test": test, "wall_time_s": round(wall_time, 2),
            "environment": provenance.environment(config.model.dtype),
        }
        if jax.process_index() == 0:
            files.write_json(os.path.join(self.workdir, "results.json"), results)
        if jax.process_count() > 1:  # a study's next run may read it (a teacher's selected step) on any process
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("transferlab: results.json written")
        return results


def check_config(config, devices=None) -> None:
    """Builds a run's Trainer without data, state or checkpoints: models, taps, connectors, optimizer
    and shardings are checked abstractly, one train step is traced on abstract values (a loss's
    own shape checks), and the teacher and init checkpoints that exist already are checked against the
    models on their metadata, all without compute (raises ConfigError/UserError as the run would)."""
    trainer = Trainer(config, workdir="", devices=devices)
    trainer.trace_train_step()
    trainer.check_checkpoint_inputs()


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Trains (or resumes) one run in `workdir` and returns its results."""
    if config.study.arms:
        raise ConfigError("config key 'study.arms': this config is a study of several runs, and "
                          "train_and_evaluate trains one; run it with python -m transferlab.main, or "
                          "transferlab.study.run_study(config, workdir, train_and_evaluate)")
    return Trainer(config, workdir, devices).run()


def write_config(config, workdir: str) -> None:
    """DIR/config.json: the resolved config plus versions and the git commit."""
    if jax.process_index() != 0:
        return
    import flax
    resolved = config_lib.to_plain(config)
    resolved["_versions"] = {"transferlab": transferlab.__version__, "jax": jax.__version__,
                             "flax": flax.__version__, "optax": optax.__version__,
                             "git_commit": provenance.git_commit(short=False),
                             "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
                             "processes": jax.process_count()}
    resolved.update(run_location(workdir))
    files.write_json(os.path.join(workdir, "config.json"), resolved)


def run_location(workdir: str) -> dict:
    """Where a run is, and where its relative paths start, as its saved configs record them (config.json
    and each checkpoint's copy): `config.first_difference` follows teachers that moved along with it."""
    return {"_run_dir": os.path.abspath(workdir), "_cwd": os.getcwd()}

