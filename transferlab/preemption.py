"""Graceful stops: SIGTERM (a scheduler's preemption) and Ctrl-C finish the step, save, and exit.

`python -m transferlab.main` calls `install()` first thing, so a signal is noted wherever it
arrives (imports, compilation, a teacher-cache build, between a study's runs): the train loop
saves at the end of its current step and returns, a study starts no further run. A second
Ctrl-C stops at once (`KeyboardInterrupt`; the last complete checkpoint is kept). In-process
callers (tests, notebooks) that never call `install()` get a SIGTERM handler for the duration of
each `Trainer.run` (`handling_signals`), and Ctrl-C keeps Python's meaning there.

Several processes (`jax.distributed`) must stop at the same step, or the checkpoint save (a
collective) hangs: after `jax.distributed.initialize` JAX's preemption notifier owns SIGTERM and
spreads it to every process, and `defer_to_jax()` makes the train loop stop at JAX's preemption
sync point (`multihost_utils.reached_preemption_sync_point`, the same step everywhere); Ctrl-C is
turned into a SIGTERM to the process itself, so it takes the same path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class StopFlag:
    """Which stop signal arrived first (None: none yet)."""

    def __init__(self):
        self.signum = None
        self.deferred = False  # several processes: stop at JAX's preemption sync point (`should_stop`)
        self._sync_calls = 0  # train steps this process has taken, over all its runs (a study's too)

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum, frame):  # noqa: ARG002  (signal handler signature)
        if self.deferred:  # (only SIGINT still reaches Python: JAX's notifier holds SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self._stop(signum)

    def _stop(self, signum) -> None:
        self.signum = signum
        again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT and not self.deferred else ""
        print(f"transferlab: {self.name}: finishing the current step, saving a checkpoint, then stopping"
              f"{again}", file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        """Whether to save and stop after the current train step: a stop signal has arrived (one process),
        or every process has reached JAX's preemption sync point (several processes; called at every step
        on each). The sync point is counted in steps this process took over all its runs, which every
        process counts alike and which only grows: a study's next run starts again at step 1, and a notice
        that arrives between two runs then stops the next one after its first step."""
        if self.deferred and not self.raised:
            from jax.experimental import multihost_utils
            self._sync_calls += 1
            if multihost_utils.reached_preemption_sync_point(self._sync_calls):
                self._stop(signal.SIGTERM)
        return self.raised


_FLAG: StopFlag | None = None
_PREVIOUS: dict = {}  # signal -> the handler `install` replaced


def install() -> StopFlag:
    """The process-wide flag, set by SIGTERM and SIGINT from now on (main thread only; idempotent)."""
    global _FLAG
    if _FLAG is None:
        flag = StopFlag()
        for signum in (signal.SIGTERM, signal.SIGINT):
            _PREVIOUS[signum] = signal.getsignal(signum)
            signal.signal(signum, flag.handle)
        _FLAG = flag
    return _FLAG


def uninstall() -> None:
    """Puts back the handlers `install` replaced and forgets the flag, so that an in-process caller's next
    run (`main.run` from a notebook) does not inherit an earlier stop, and Ctrl-C interrupts it again."""
    global _FLAG
    for signum, previous in _PREVIOUS.items():
        with contextlib.suppress(ValueError, TypeError):  # (not the main thread; a handler set outside Python)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    _PREVIOUS.clear()
    _FLAG = None


def defer_to_jax() -> None:
    """After `jax.distributed.initialize` with several processes: stops happen at JAX's preemption sync point."""
    import jax
    if _FLAG is not None and jax.process_count() > 1:
        _FLAG.deferred = True


def requested() -> StopFlag | None:
    """The installed flag if a stop signal has arrived, else None."""
    return _FLAG if _FLAG is not None and _FLAG.raised else None


@contextlib.contextmanager
def handling_signals():
    """The installed flag; without one, a flag set by SIGTERM for the duration of the block."""
    if _FLAG is not None:
        yield _FLAG
        return
    flag, previous = StopFlag(), None
    try:
        previous = signal.signal(signal.SIGTERM, flag.handle)
    except ValueError:  # not the main thread: no handler, the flag stays unset
        pass
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
