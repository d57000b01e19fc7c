"""Small helpers every stage uses: content hashes, canonical JSON, one-line error messages.

Written once here so that a dataset id, a pipeline cache key and an audit hash are computed the same
way everywhere (a second, slightly different canonical form would give the same object two ids).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def canonical_json(obj: Any) -> str:
    """The one JSON text of obj: sorted keys, no spaces, UTF-8 as is, no NaN (not JSON); values JSON
    has no type for (datetimes, paths) as their str()."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def sha256_json(obj: Any) -> str:
    """Hex sha256 of obj's canonical JSON: a content address for configs, manifests, cache keys."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its first non-empty one), for errors a user reads: never
    a traceback, and for wrapped errors (MLflow, SQLAlchemy) not the pages of context below it."""
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that id exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(prefix: str) -> str:
    """A temporary file or folder name that says which process made it: `{prefix}{pid}-{random}`, so a
    later process can tell a crashed writer's leftovers (remove_stale_temps) from a live writer's."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temps(folder: Path, prefix: str) -> list[Path]:
    """Delete what temp_name(prefix) made in folder for processes that are gone (killed mid-write);
    return what was removed. Entries of live processes, and names not of that form, are left alone."""
    removed = []
    for entry in Path(folder).glob(f"{glob.escape(prefix)}*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Move the finished folder tmp (beside dest, on the same file system) to dest. A folder already at
    dest is moved aside first and removed after, so dest is at every moment either the old folder or
    the new one, never half of each."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest
