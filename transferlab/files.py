"""Result files written atomically: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON (values JSON cannot hold are written as their str())."""
    write_text(path, json.dumps(obj, indent=2, default=str))
