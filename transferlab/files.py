"""Result files written atomically: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

from transferlab.errors import UserError


def is_storage_url(path) -> bool:
    """'gs://bucket/...', 's3://...': not a local path (os and pathlib would make a local 'gs:/...' of it)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def unwritable(error: OSError, path: str) -> UserError:
    """The one-line error for a workdir file that cannot be written (a directory in its place, no space,
    no permission): names the file and the reason."""
    target = error.filename2 or error.filename or path  # (os.replace: the file renamed over)
    reason = "exists and is not a directory" if error.errno == errno.EEXIST else (error.strerror or str(error))
    return UserError(f"cannot write {target}: {reason}")


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed over it."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise unwritable(e, path) from None


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON (values JSON cannot hold are written as their str())."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def outermost_missing(path: str) -> str | None:
    """The outermost directory that creating `path` would create (`path` itself, or the first of its missing
    parents), or None if `path` exists: what to remove again when a command fails before writing anything."""
    created = os.path.abspath(path)
    if os.path.lexists(created):
        return None
    while not os.path.lexists(os.path.dirname(created)):
        created = os.path.dirname(created)
    return created


def remove_if_nothing_written(directory: str, bookkeeping=()) -> None:
    """Removes a directory this process created if no file lies under it but the `bookkeeping` files (paths,
    e.g. a study's plan): bad input found once a command has started (a checkpoint of another model, a
    metric the task does not report) leaves nothing behind."""
    ignored = {os.path.abspath(p) for p in bookkeeping}
    for root, _, names in os.walk(directory):
        if {os.path.abspath(os.path.join(root, n)) for n in names} - ignored:
            return
    shutil.rmtree(directory, ignore_errors=True)
