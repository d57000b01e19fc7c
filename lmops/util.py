"""Small helpers every stage uses: content hashes, canonical JSON, one-line error messages.

Written once here so that a dataset id, a pipeline cache key and an audit hash are computed the same
way everywhere (a second, slightly different canonical form would give the same object two ids).
"""

from __future__ import annotations

import hashlib
import json
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
