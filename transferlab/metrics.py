"""Metric writers: `metrics.jsonl` (one JSON object per event, always with `step`),
TensorBoard (tensorboardX) and the console, plus a tqdm progress bar on a terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from transferlab import files


def _plain(value):
    value = float(value) if hasattr(value, "dtype") or isinstance(value, (int, float)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_label(workdir: str) -> str:
    """How log lines name a run: its directory's name, with the arm for a study's runs ('teacher/seed_0')."""
    path = os.path.normpath(os.path.abspath(workdir))
    name = os.path.basename(path)
    return f"{os.path.basename(os.path.dirname(path))}/{name}" if name.startswith("seed_") else name


class MetricWriter:
    """Writes on process 0 only; other processes get a no-op writer."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        try:
            _truncate_after(self.path, start_step)  # a killed run may have logged past its last checkpoint
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:  # a resume purges the earlier files' events after the checkpoint (logged again)
                self._tb = _TensorBoard(os.path.join(workdir, "tensorboard"),
                                        purge_from=start_step + 1 if start_step >= 0 else None)
        except OSError as e:  # e.g. metrics.jsonl a directory, `tensorboard` a file
            raise files.unwritable(e, self.path) from None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step",
                             desc=run_label(workdir))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.scalar(key, value, int(step))
        shown = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        text = " ".join([f"{k}={v:.4g}" for k, v in shown.items()] +
                        [str(v) for v in record.values() if isinstance(v, str)])  # events
        if self._bar is not None:
            self._bar.set_postfix_str(text[:120], refresh=False)
            self._bar.write(f"step {step}: {text}") if any(k.startswith("eval/") for k in shown) else None
        else:
            print(f"[{run_label(os.path.dirname(self.path))}] step {step}: {text}", flush=True)

    def flush(self) -> None:
        """Puts TensorBoard's buffered events on disk (with each checkpoint: a kill loses only what the
        resume logs again)."""
        if self._tb is not None:
            self._tb.flush()

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step`."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


class _TensorBoard:
    """Scalars to a tfevents file, written synchronously: tensorboardX's SummaryWriter queues events for a
    thread that its flush() does not drain, so a killed run lost whatever was still queued for good."""

    def __init__(self, logdir: str, purge_from: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        os.makedirs(logdir, exist_ok=True)
        self._event, self._summary = Event, scalar
        self._writer = EventsWriter(os.path.join(logdir, "events"))
        if purge_from is not None:  # TensorBoard's restart marker: drop earlier files' events from this step on
            self._writer.write_event(Event(wall_time=time.time(), step=purge_from,
                                           session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=self._summary(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops records with step > `step` (written after the checkpoint a resume starts from), and the final
    evaluation's records (a run killed after logging them, before results.json, evaluates again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:  # bytes that are not UTF-8: a damaged line
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            if record["step"] <= step and not any(str(k).startswith("final/") for k in record):
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill
    if kept != lines:
        files.write_text(path, "".join(kept))  # atomic: a kill now leaves the old file, never an empty one


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
