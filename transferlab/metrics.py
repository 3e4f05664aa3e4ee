"""Metric writers: `metrics.jsonl` (one JSON object per event, always with `step`),
TensorBoard (tensorboardX) and the console, plus a tqdm progress bar on a terminal."""

from __future__ import annotations

import json
import math
import os
import sys

import jax


def _plain(value):
    value = float(value) if hasattr(value, "dtype") or isinstance(value, (int, float)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


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
        _truncate_after(self.path, start_step)  # a killed run may have logged past its last checkpoint
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step",
                             desc=os.path.basename(os.path.normpath(workdir)))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, int(step))
        shown = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text[:120], refresh=False)
            self._bar.write(f"step {step}: {text}") if any(k.startswith("eval/") for k in shown) else None
        else:
            print(f"[{os.path.basename(os.path.dirname(self.path))}] step {step}: {text}", flush=True)

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


def _truncate_after(path: str, step: int) -> None:
    """Drops records with step > `step` (written after the checkpoint a resume starts from)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line from a kill
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
