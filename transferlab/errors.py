"""User-facing errors (one line naming the culprit, exit code 2, no traceback) and notes."""

import argparse
import os
import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (config, name, file). `main` prints it on one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key and the allowed values."""


def unknown_name(kind: str, name, allowed) -> ConfigError:
    """The standard error for an unknown registry name (model, loss, dataset, ...)."""
    return ConfigError(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(allowed))}")


def first_line(error: BaseException, innermost: bool = False, limit: int = 300, typed: bool = True) -> str:
    """'Type: first non-empty line of the message' of `error` (with `innermost`, of the exception it was
    raised from, e.g. TensorStore's or json's own; without `typed`, the line alone), at most `limit`
    characters: for one-line errors."""
    root = error
    while innermost:
        inner = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if inner is None:
            break
        root = inner
    first = next((line for line in str(root).splitlines() if line.strip()), "")
    if not first:
        return type(root).__name__
    return (f"{type(root).__name__}: {first}" if typed else first)[:limit]


def note(message: str) -> None:
    """One '[note] ...' line on stderr, from process 0 only: something a run does that its user may not
    expect (a teacher that has not finished, a clipped hyper-parameter), said once, not an error."""
    import jax
    if jax.process_index() == 0:
        print(f"[note] {message}", file=sys.stderr, flush=True)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run stopped and its last good checkpoint is kept."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, '<label>: error: ...', and exit 2 (no usage dump). Options
    are taken by their full names only (`--work` is not `--workdir`: an abbreviation slipped past the checks
    for an option given twice)."""

    def __init__(self, *args, label: str = "transferlab", **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.label = label

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.label}: error: {message}\n")


def exit_with(main) -> None:
    """`sys.exit(main())`, quietly when the reader of stdout has gone (`python -m transferlab.report DIR | head`):
    exit 141, as a shell reports a pipe's writer stopped by SIGPIPE, and no BrokenPipeError traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit)
        code = 141
    sys.exit(code)
