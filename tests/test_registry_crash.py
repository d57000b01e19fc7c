"""`register` killed with SIGKILL at any moment leaves a registry the next `register` completes: one
version per run and checkpoint, with its card, its alias and its audit entries."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_killed_after, tokenized
from mlflow import MlflowClient

from lmops import registry, tracking
from lmops.checkpoint import Checkpoint, save_checkpoint
from lmops.config import override
from lmops.data.demo import demo_corpus
from lmops.evaluate import check_gates, evaluate_checkpoint
from lmops.train import train
from lmops.workspace import init_workspace

# Registers the checkpoint argv[3] of run argv[2] as model argv[4]; audit entries go to argv[5], one
# JSON line each, flushed and fsynced as a database commit would be.
REGISTER = """
import json, os, sys
from pathlib import Path
from lmops import registry
from lmops.config import override
from lmops.evaluate import check_gates
from lmops.workspace import Workspace

root, run_id, ckpt, name, audit_file, results_file = sys.argv[1:7]
ws = Workspace(Path(root))
cfg = override(ws.config(), [f"registry.model_name={name}"] + sys.argv[7:])
results = json.loads(Path(results_file).read_text())

def audit(action, subject, details, reason=None):
    with open(audit_file, "a") as f:
        f.write(json.dumps({"action": action, "subject": subject}) + "\\n")
        f.flush()
        os.fsync(f.fileno())

print("ready", flush=True)
registry.register(ws, cfg, run_id, Path(ckpt), results, check_gates(results, cfg.evaluate.gates, None), None, audit)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = init_workspace(tmp_path_factory.mktemp("registry-crash") / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    cfg = override(ws.config(), TINY + ["evaluate.max_new_tokens=16"])
    tokens = Path(tokenized(ws, cfg)["tokens_dir"])
    with tracking.start_training_run(ws, cfg, "ds-1", tokens / "tokenizer.json", "main") as run:
        result = train(cfg, tokens, ws.run_dir("main"), tokens, progress=False,
                       log=lambda m: None, on_metrics=run.log_row)
    results = evaluate_checkpoint(result.checkpoint, tokens, cfg)
    results_file = ws.root / "results.json"
    results_file.write_text(json.dumps(results, default=str))
    return ws, TINY + ["evaluate.max_new_tokens=16"], run.run_id, result.checkpoint, results_file


def _variant(ckpt, folder):
    """Another checkpoint of the run (other bytes): each try registers one the run has no model of
    yet, so the whole registration (logging the MLflow model included) is exposed to the kill."""
    source = Checkpoint(ckpt)
    path = save_checkpoint(folder / "ckpt.safetensors", source.model(), meta=source.meta | {"variant": folder.name})
    for name in tracking.TOKENIZER_FILES:
        shutil.copy(ckpt.parent / name, folder / name)
    return path


def _register(trained, ckpt, name, audit_file, delay):
    """REGISTER in a subprocess, SIGKILLed `delay` seconds after its imports (None: not killed);
    return the seconds it ran after its imports."""
    ws, sets, run_id, _, results_file = trained
    return run_killed_after([sys.executable, "-c", REGISTER, str(ws.root), run_id, str(ckpt), name, str(audit_file),
                             str(results_file), *sets], ws.root, delay)


def test_a_kill_during_register_is_completed_by_the_next(trained):
    ws, sets, run_id, ckpt, results_file = trained
    base = override(ws.config(), sets)
    took = _register(trained, _variant(ckpt, ws.root / "v-first"), "first", ws.root / "first.jsonl", None)
    results = json.loads(results_file.read_text())
    for i, fraction in enumerate((0.05, 0.25, 0.45, 0.65, 0.8, 0.95)):
        name, audit_file = f"crash{i}", ws.root / f"crash{i}.jsonl"
        variant = _variant(ckpt, ws.root / f"v{i}")
        _register(trained, variant, name, audit_file, took * fraction)

        cfg = override(base, [f"registry.model_name={name}"])
        entries = []
        version = registry.register(ws, cfg, run_id, variant, results, check_gates(results, cfg.evaluate.gates, None),
                                    None, lambda action, subject, details, reason=None: entries.append(action))
        c = MlflowClient(tracking.tracking_uri(ws, cfg))
        versions = c.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"] == [version], f"kill at {took * fraction:.2f}s"
        mv = versions[0]
        assert mv.tags["lmops.registration"] == "complete" and mv.tags["model_card"].endswith(f"{name}-v1.md")
        assert mv.source.startswith("models:/m-") and str(c.get_model_version_by_alias(name, "challenger").version) == "1"
        # the audit log and the registry agree: each entry of v1 is there (a kill between an entry and
        # its mark on the version may repeat it, never lose it), nothing about a version that is not
        before = [json.loads(line) for line in audit_file.read_text().splitlines()] if audit_file.exists() else []
        actions = [e["action"] for e in before] + entries
        assert set(actions) == {"model.registered", "model.alias_set"}, actions
        assert all(e["subject"] == f"model:{name}/1" for e in before)
        assert len(actions) <= 3, actions
        assert Checkpoint(registry.download_checkpoint(ws, cfg, f"{name}@1")).meta["variant"] == f"v{i}"
    assert os.path.getsize(ws.root / "first.jsonl") > 0
