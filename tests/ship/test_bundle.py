"""Model bundles (`lmops package`, `lmops serve --bundle`): what is in one, that `sha256sum -c` agrees with
its manifest, that any change to it is refused by name before loading, and that a server of one answers
under the bundle's name and version, over real HTTP with the openai client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lmops.cli import app
from lmops.errors import LmopsError
from lmops.ship.bundle import CARD, LOCK, MANIFEST, META, verify_bundle, write_bundle
from lmops.workspace import init_workspace
from serve.conftest import alphabet_tokenizer, free_port, save_model, table_model, wait_ready
from test_registry import register, setup, trained  # noqa: F401 - trained is a fixture


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A workspace and a checkpoint folder of the tiny table model."""
    root = tmp_path_factory.mktemp("bundle")
    ws = init_workspace(root / "ws")
    tok = alphabet_tokenizer()
    save_model(root / "model", table_model(tok), tok)
    return ws, root / "model"


def test_a_bundle_holds_the_model_and_its_manifest_checks_with_sha256sum(local, tmp_path):
    ws, model = local
    meta = write_bundle(ws, ws.config(), str(model), tmp_path / "b")
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"ckpt.safetensors", "tokenizer.json", META, CARD, LOCK, MANIFEST} <= files
    assert meta["name"] == "model" and meta["version"] and meta["lineage"] is None
    assert json.loads((tmp_path / "b" / META).read_text())["model_config"]["n_layer"] == 2
    lock = (tmp_path / "b" / LOCK).read_text()
    assert f"torch=={__import__('torch').__version__}" in lock and "safetensors==" in lock
    # the manifest is sha256sum's format: the system tool checks it as it is
    ok = subprocess.run(["sha256sum", "-c", MANIFEST], cwd=tmp_path / "b", capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == len(files) - 1, ok.stdout + ok.stderr
    assert verify_bundle(tmp_path / "b")["version"] == meta["version"]


@pytest.mark.parametrize("change, message", [
    (lambda b: (b / "ckpt.safetensors").write_bytes((b / "ckpt.safetensors").read_bytes()[:-1] + b"\0"),
     "ckpt.safetensors changed since it was packaged"),
    (lambda b: (b / "tokenizer.json").unlink(), "missing tokenizer.json"),
    (lambda b: (b / "extra.py").write_text("import os"), "extra.py not in MANIFEST.sha256"),
    (lambda b: (b / MANIFEST).write_text("nonsense\n"), "line 1 is not"),
    (lambda b: (b / MANIFEST).write_text((b / MANIFEST).read_text().replace("  ckpt", "  ../ckpt")),
     "line"),
])
def test_a_changed_bundle_is_refused_by_name_before_loading(local, tmp_path, change, message):
    ws, model = local
    write_bundle(ws, ws.config(), str(model), tmp_path / "b")
    change(tmp_path / "b")
    with pytest.raises(LmopsError, match=message):
        verify_bundle(tmp_path / "b")
    # and so is serving it: the model source checks before it reads a byte of the weights
    from lmops.serve.source import ModelSource

    with pytest.raises(LmopsError, match=message):
        ModelSource(ws, ws.config(), str(tmp_path / "b"))


def test_package_refuses_a_folder_with_files_unless_forced(local, tmp_path):
    ws, model = local
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    cli = CliRunner()
    refused = cli.invoke(app, ["package", str(model), str(tmp_path / "b"), "-w", str(ws.root)])
    assert refused.exit_code == 1 and "not empty" in refused.output and (tmp_path / "b" / "keep.txt").exists()
    forced = cli.invoke(app, ["package", str(model), str(tmp_path / "b"), "--force", "-w", str(ws.root)])
    assert forced.exit_code == 0, forced.output
    assert not (tmp_path / "b" / "keep.txt").exists() and verify_bundle(tmp_path / "b")
    unknown = cli.invoke(app, ["package", str(tmp_path / "nope"), str(tmp_path / "c"), "-w", str(ws.root)])
    assert unknown.exit_code == 1 and "no such file or folder" in unknown.output and not (tmp_path / "c").exists()


def test_a_registry_version_is_packaged_with_its_card_and_lineage(trained, tmp_path):
    ws, cfg, run_id, ckpt, results = setup(trained, "bundled")
    version = register(ws, cfg, run_id, ckpt, results)
    meta = write_bundle(ws, cfg, f"bundled@{version}", tmp_path / "b")
    assert (meta["name"], meta["version"], meta["ref"]) == ("bundled", str(version), f"bundled@{version}")
    assert meta["lineage"]["run"]["id"] == run_id and meta["lineage"]["dataset"]
    card = (tmp_path / "b" / CARD).read_text()
    assert "bundled" in card and "no model card was recorded" not in card
    # the same weights as the registry's: the bundle's checkpoint loads to equal tensors
    from lmops import registry
    from lmops.checkpoint import Checkpoint

    a, b = Checkpoint(registry.download_checkpoint(ws, cfg, f"bundled@{version}")).model(), \
        Checkpoint(tmp_path / "b" / "ckpt.safetensors").model()
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_serve_bundle_answers_under_the_bundles_name_and_version(local, tmp_path):
    """The CLI's `lmops serve --bundle` in its own process, a real openai client."""
    import os

    import openai

    from lmops.store import Store

    ws, model = local
    write_bundle(ws, ws.config(), str(model), tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with Store.for_workspace(ws) as store:
        _, secret = store.keys.create("bundle test", "inference", "tests")
    bad = subprocess.run([sys.executable, "-m", "lmops", "serve", "--bundle", str(tmp_path / "bad"), "-w",
                          str(ws.root), "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "tokenizer.json changed since it was packaged" in bad.stderr, bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--bundle", str(tmp_path / "b"), "-w",
                             str(ws.root), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        meta = verify_bundle(tmp_path / "b")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret)
        answer = client.completions.create(model="model", prompt="the quick", max_tokens=3, temperature=0)
        assert answer.system_fingerprint == f"model-v{meta['version']}" and answer.choices[0].text
    finally:
        proc.terminate()
        proc.wait(30)
