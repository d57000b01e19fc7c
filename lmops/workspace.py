"""A workspace: a folder holding lmops.yaml and a .lmops/ folder of state.

Found from --workspace, else LMOPS_WORKSPACE, else the current folder or its nearest parent that
holds lmops.yaml. Every path lmops writes is named here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmops.config import CONFIG_FILE, Config, load_config, render_default_yaml
from lmops.errors import LmopsError

STATE_DIR = ".lmops"
ENV_VAR = "LMOPS_WORKSPACE"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def runs_dir(self) -> Path:
        return self.state / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def config(self) -> Config:
        return load_config(self.config_path)

    def resolve(self, path: str | Path) -> Path:
        """A path from the config or the command line, relative to the workspace root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p


def init_workspace(root: Path, force: bool = False, config: Config | None = None) -> Workspace:
    """Create root/lmops.yaml (config's values, else the defaults), .lmops/ and corpus/."""
    root = root.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise LmopsError(f"{root}: exists and is not a folder")
    ws = Workspace(root)
    if ws.config_path.exists() and not force:
        raise LmopsError(f"{ws.config_path}: already exists; pass --force to overwrite it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        ws.config_path.write_text(render_default_yaml(config), encoding="utf-8")
        ws.state.mkdir(exist_ok=True)
        (root / "corpus").mkdir(exist_ok=True)
    except OSError as err:
        raise LmopsError(f"cannot create a workspace in {root}: {err.strerror or err} ({err.filename or root}); "
                         "choose a folder you can write to") from None
    return ws


def find_workspace(explicit: str | Path | None = None) -> Workspace:
    given = explicit or os.environ.get(ENV_VAR)
    if given:
        root = Path(given).expanduser().resolve()
        if not (root / CONFIG_FILE).is_file():
            raise LmopsError(f"{root}: no {CONFIG_FILE} here; run `lmops init {given}` first")
        return Workspace(root)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return Workspace(folder)
    raise LmopsError(
        f"no {CONFIG_FILE} in {here} or its parents; run `lmops init`, or pass --workspace / set {ENV_VAR}"
    )
