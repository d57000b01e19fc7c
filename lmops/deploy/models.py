"""A deployment's model reference resolved once, when it is deployed: a registry version stays that
version (an alias moving later does not change what the deployment serves; deploy again, or roll out, to
move it), a local path is kept as its absolute path with its file's hash as the version, as the server's
ModelSource names it (lmops/serve/source.py)."""

from __future__ import annotations

from pathlib import Path

from lmops.config import Config
from lmops.deploy.endpoints import RUNTIMES, Deployment, check_name
from lmops.errors import LmopsError


def resolve_deployment(ws, cfg: Config, endpoint: str, name: str, ref: str, runtime: str | None = None,
                       max_batch: int | None = None) -> Deployment:
    """The Deployment `ref` names now; an unknown reference is refused with the reason."""
    check_name(name, "deployment")
    if runtime is not None and runtime not in RUNTIMES:
        raise LmopsError(f"--runtime {runtime}: use one of {', '.join(RUNTIMES)} (or leave it to serve.runtime)")
    if max_batch is not None and max_batch < 1:
        raise LmopsError(f"--max-batch {max_batch}: at least 1")
    from lmops.serve.source import ModelSource

    if Path(ref).expanduser().exists():
        src = ModelSource(ws, cfg, ref)
        path = src.path.resolve()
        return Deployment(endpoint, name, ref, src.name, src.version(), str(path), runtime, max_batch)
    from lmops import registry

    if ref.endswith(".safetensors") or ("/" in ref and not ref.startswith("models:/")):
        ModelSource(ws, cfg, ref)  # raises: no such file or folder
    mv = registry.resolve(ws, cfg, ref)  # raises for an unknown model, alias or version
    return Deployment(endpoint, name, ref, mv.name, str(mv.version), f"models:/{mv.name}/{mv.version}", runtime,
                      max_batch)
