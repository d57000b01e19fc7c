"""A model bundle: one folder that serves a model wherever lmops is installed (a container, another
machine), checked before it is loaded.

`lmops package REF OUT` writes, for a registry version or a local checkpoint / Hugging Face folder:

  ckpt.safetensors    the weights only (no optimizer state), the model's config in its metadata
  tokenizer.json      the tokenizer (with tokenizer_config.json / config.json when the source had them:
                      a Hugging Face model's chat template and end-of-text id)
  bundle.json         name, version, the reference it came from, the model config, its lineage (run,
                      dataset, code) for a registry version, when and by which lmops it was packaged
  MODEL_CARD.md       the registry's model card (a local checkpoint: a short one saying what it is)
  requirements.lock   the Python packages of the environment that packaged it, name==version: what an
                      image serving it should install to get the same numerics
  MANIFEST.sha256     every file above with its sha256, in `sha256sum` format (`sha256sum -c` checks it too)

Loading a bundle (`lmops serve --bundle OUT`, or any reference to the folder) first checks the manifest:
a file changed, missing or added is refused with its name before anything is read. The served name and
version are the bundle's, so requests and the request log name the registry version it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.util import replace_dir, sha256_file

MANIFEST = "MANIFEST.sha256"
META = "bundle.json"
CARD = "MODEL_CARD.md"
LOCK = "requirements.lock"
FORMAT = "lmops-bundle-1"
_COPIED = ("tokenizer_config.json", "config.json")  # a Hugging Face source's chat template and eos id


def is_bundle(folder: Path) -> bool:
    return folder.is_dir() and (folder / META).is_file() and (folder / MANIFEST).is_file()


def require_bundle(folder: Path) -> None:
    if not is_bundle(Path(folder)):
        raise LmopsError(f"{folder}: not a model bundle (no {META} and {MANIFEST}); make one with `lmops package`")


def write_bundle(ws, cfg: Config, ref: str, out: Path, force: bool = False) -> dict:
    """Package what `ref` names into `out` (refused when out holds files, unless force); bundle.json's dict."""
    from lmops.checkpoint import CKPT_NAME, save_checkpoint
    from lmops.serve.source import ModelSource
    from lmops.tokenizer import save_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmopsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmopsError(f"{out} is not empty: give an empty or new folder, or --force to replace it")
    source = ModelSource(ws, cfg, ref)
    served = source.load()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # replaced in whole, at the end
    try:
        save_checkpoint(tmp / CKPT_NAME, served.model, meta={"bundle": True})
        save_tokenizer(served.tokenizer, tmp)
        folder = _source_folder(ws, cfg, source)
        for name in _COPIED:
            if (folder / name).is_file() and not (tmp / name).exists():
                shutil.copy2(folder / name, tmp / name)
        lineage, card = _registry_facts(ws, cfg, source, served)
        meta = {"format": FORMAT, "name": served.name, "version": served.version, "ref": ref,
                "model_config": served.model.cfg.to_dict(), "lineage": lineage,
                "packaged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "lmops_version": _version("lmops")}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(card, encoding="utf-8")
        (tmp / LOCK).write_text(_lock(), encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MANIFEST).write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in files), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the bundle from the server's user
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def verify_bundle(folder: Path) -> dict:
    """Check every file against MANIFEST.sha256 (and that nothing was added); bundle.json's dict."""
    folder = Path(folder)
    require_bundle(folder)
    listed: dict[str, str] = {}
    for n, line in enumerate((folder / MANIFEST).read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise LmopsError(f"{folder / MANIFEST}: line {n} is not '<sha256>  <relative path>'")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if missing := sorted(set(listed) - present):
        raise LmopsError(f"bundle {folder}: missing {', '.join(missing)} (listed in {MANIFEST})")
    if added := sorted(present - set(listed)):
        raise LmopsError(f"bundle {folder}: {', '.join(added)} not in {MANIFEST}; a bundle is served only as packaged")
    for name, digest in sorted(listed.items()):
        if sha256_file(folder / name) != digest:
            raise LmopsError(f"bundle {folder}: {name} changed since it was packaged (sha256 differs from {MANIFEST})")
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise LmopsError(f"bundle {folder}: format {meta.get('format')!r}, this lmops reads {FORMAT}")
    return meta


def _source_folder(ws, cfg: Config, source) -> Path:
    """The folder the source's tokenizer (and Hugging Face files) are in."""
    if source.path is None:
        from lmops import registry

        return registry.download_checkpoint(ws, cfg, f"{source.registered}@{source.version()}").parent
    return source.path if source.path.is_dir() else source.path.parent


def _registry_facts(ws, cfg: Config, source, served) -> tuple[dict | None, str]:
    """(lineage, model card) of a registry version; (None, a short card) for a local path."""
    if source.path is not None:
        return None, (f"# {served.name} (local checkpoint, sha256 {served.version}...)\n\n"
                      f"Packaged from `{source.ref}`, not a registry version: no evaluation, gates or lineage are "
                      "on record. Register it (`lmops register`) to have them.\n")
    from lmops import registry

    lineage = registry.lineage(ws, cfg, f"{source.registered}@{served.version}")
    card = f"# {served.name} v{served.version}\n\n(no model card was recorded at registration)\n"
    if uri := lineage["model"].get("model_card"):
        import mlflow.artifacts

        from lmops import tracking

        try:
            with tracking.quiet_downloads():
                card = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking.tracking_uri(
                    ws, cfg))).read_text(encoding="utf-8")
        except Exception as err:  # noqa: BLE001 - the bundle is still whole without it; say so in the card
            card += f"\n(the recorded card {uri} could not be read: {err})\n"
    return lineage, card


def _lock() -> str:
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "lmops"}, key=str.lower)
    return ("# The environment that packaged this bundle (pip freeze style); lmops itself is "
            f"{_version('lmops')}.\n" + "\n".join(pins) + "\n")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
