"""Small files written atomically: a reader sees the old file or the whole new one, never a torn one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> Path:
    """``text`` to ``path`` through a temporary file in the same folder and a rename (unique per writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(fh.name, path)
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_text(path, json.dumps(value))
