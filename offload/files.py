"""Files written so that a failure or Ctrl-C never leaves a half-written one behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import OffloadError


def new_file_mode() -> int:
    """The mode open() gives a new file (0644 under the usual umask 022). A temporary file from mkstemp is 0600,
    and renamed into place it would make this one output readable by its owner only, unlike every other."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside path, then rename it over path: a failed or interrupted write never
    leaves a half-written file behind."""
    path = path.expanduser()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        reason = error.strerror or error
        raise OffloadError(f"cannot write {path}: {reason}; choose a file in a writable folder") from None
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OffloadError(f"cannot write {path}: {error.strerror or error}; choose another file") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
