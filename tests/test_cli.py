"""The lmops command, run as a user runs it: a real process in a real workspace (the `cli` fixture runs it in
this process where a test is about what commands do together rather than about the process: each process
start costs seconds of imports)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from lmops.cli import app


def lmops(*args, cwd=None, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "lmops.cli", *args], check=False, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_has_help():
    runner = CliRunner()
    commands = list(all_commands(get_command(app)))
    assert {("init",), ("train",), ("generate",), ("tokenizer", "train"), ("quickstart",), ("export",)} <= set(commands)
    for cmd in commands:
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0, (cmd, result.output)
        assert "Usage" in result.output and len(result.output) > 200


def test_train_and_generate_from_the_workspace_folder(workspace, tiny_sets):
    sub = workspace.root / "corpus"  # found from a subfolder
    sets = [a for item in tiny_sets for a in ("--set", item)]
    proc = lmops("train", *sets, "--no-progress", cwd=sub)
    assert "val loss" in proc.stderr and "checkpoint:" in proc.stderr
    one = lmops("generate", "The ", "--max-tokens", "40", "--seed", "3", cwd=sub).stdout
    two = lmops("generate", "The ", "--max-tokens", "40", "--seed", "3", cwd=sub).stdout
    other = lmops("generate", "The ", "--max-tokens", "40", "--seed", "4", cwd=sub).stdout
    assert one == two and one != other and one.startswith("The ")
    greedy = lmops("generate", "The ", "--max-tokens", "10", "--temperature", "0", "--workspace", str(workspace.root))
    assert greedy.stdout.startswith("The ")


def test_workspace_from_env_and_clear_errors(tmp_path, workspace):
    proc = lmops("tokenizer", "train", env={"LMOPS_WORKSPACE": str(workspace.root)}, cwd=tmp_path)
    tokens = proc.stderr.split("tokenizer and token shards in ")[1].split()[0]
    assert {"tokenizer.json", "train.bin", "val.bin"} <= {p.name for p in Path(tokens).iterdir()}
    proc = lmops("train", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "no lmops.yaml" in proc.stderr and "Traceback" not in proc.stderr
    (workspace.config_path).write_text("train:\n  max_step: 3\n")
    proc = lmops("train", "-w", str(workspace.root), check=False)
    assert proc.returncode == 1 and "unknown key 'train.max_step'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9 au lait " * 10, "UTF-8"),
])
def test_bad_corpus_is_one_line_naming_the_file(workspace, content, message):
    (workspace.root / "corpus" / "docs.txt").unlink(missing_ok=True)
    (workspace.root / "corpus" / "bad.txt").write_bytes(content)
    proc = lmops("train", "-w", str(workspace.root), check=False)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if content:
        assert "bad.txt" in proc.stderr


def test_init_refuses_to_overwrite(tmp_path):
    lmops("init", str(tmp_path / "w"))
    assert (tmp_path / "w" / "lmops.yaml").exists() and (tmp_path / "w" / ".lmops").is_dir()
    proc = lmops("init", str(tmp_path / "w"), check=False)
    assert proc.returncode == 1 and "--force" in proc.stderr


def test_export_then_import_round_trip(workspace, tiny_sets, tmp_path, cli):
    sets = [a for item in tiny_sets for a in ("--set", item)]
    cli("train", *sets, "--set", "train.max_steps=2", "--no-progress")
    cli("export", str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    cli("import", str(tmp_path / "hf"), "-r", "back")
    a = cli("generate", "The", "--temperature", "0", "--max-tokens", "12", "-r", "main")
    b = cli("generate", "The", "--temperature", "0", "--max-tokens", "12", "-r", "back")
    assert a.split("\n")[-2] == b.split("\n")[-2] and a.split("\n")[-2].startswith("The")


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_caches_the_second_time(tmp_path):
    proc = lmops("quickstart", str(tmp_path / "qs"), "--steps", "20")
    assert "sample from the champion" in proc.stderr and proc.stdout.strip()
    assert list((tmp_path / "qs" / ".lmops" / "runs").glob("pipeline-*/ckpt.safetensors"))
    again = lmops("pipeline", "run", "-w", str(tmp_path / "qs"))
    assert "nothing changed: every step was cached" in again.stderr
    assert "hash chain verified" in lmops("audit", "verify", "-w", str(tmp_path / "qs")).stderr


def test_governance_commands(workspace, tiny_sets, cli):
    """train -> evaluate -> register -> approve -> promote -> lineage -> audit, as a person types them (in this
    process: what is tested is the commands' logic; the process boundary is tested above and below)."""
    sets = [a for item in [*tiny_sets, "evaluate.max_new_tokens=4", "registry.require_approval=true",
                           "registry.approvers=[alice]"] for a in ("--set", item)]
    (workspace.root / "lmops.yaml").write_text(
        "registry:\n  require_approval: true\n  approvers: [alice]\nevaluate:\n  max_new_tokens: 4\n")
    cli("train", *sets[:len(tiny_sets) * 2], "--no-progress")
    ev = cli("evaluate")
    assert "val loss" in ev and "safety" in ev
    assert "version 1" in cli("register")
    refused = cli("promote", code=1)
    assert "needs approval by one of alice" in refused
    assert "mallory" in cli("approve", "1", "--as", "mallory", code=1)
    cli("approve", "1", "--as", "alice")
    assert "version 1 is champion" in cli("promote")
    listed = cli("models", "list")
    assert "@challenger @champion" in listed and "passed" in listed and "alice" in listed
    lineage = cli("lineage", "@champion")
    assert "lmops-model v1 @challenger, @champion" in lineage and "approved by alice" in lineage
    audit = cli("audit", "list")
    assert all(a in audit for a in ("model.registered", "model.approved", "model.promoted"))
    assert "hash chain verified" in cli("audit", "verify")


def test_init_of_a_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = lmops("init", str(blocker / "ws"), check=False)  # a path under a file: no user can create it
    assert proc.returncode == 1 and "cannot create a workspace" in proc.stderr and "Traceback" not in proc.stderr


def test_model_commands_default_to_the_champion_else_the_latest_run(workspace, tiny_sets, tmp_path, cli):
    none = cli("generate", "x", code=1)
    assert "no trained run" in none and "lmops train" in none
    sets = [a for item in tiny_sets for a in ("--set", item)]
    cli("train", *sets, "-r", "first", "--no-progress")
    assert "sampling from run first" in cli("generate", "The", "--max-tokens", "4")
    missing = cli("export", str(tmp_path / "hf"), "-r", "main", code=1)
    assert "no trained run 'main'" in missing and "runs: first" in missing
    cli("evaluate", "--set", "evaluate.max_new_tokens=4")
    cli("register")
    cli("promote")
    cli("train", *sets, "-r", "second", "--no-progress")  # newer than the champion's run
    assert "sampling from lmops-model v1 (champion)" in cli("generate", "The", "--max-tokens", "4")
    assert "exported lmops-model v1 (champion)" in cli("export", str(tmp_path / "hf"))


def test_train_records_its_dataset_and_data_gates_show_in_data_list(workspace, tiny_sets, cli):
    import json

    sets = [a for item in tiny_sets for a in ("--set", item)]
    cli("train", *sets, "--no-progress")
    info = json.loads((workspace.run_dir("main") / "run.json").read_text())
    listed = cli("data", "list")
    assert info["dataset"][:12] in listed and "passed" in listed
    again = cli("train", *sets, "--no-progress")
    assert "ingest    cached" in again and "tokenize  cached" in again, "unchanged corpus: no new ingest"
    (workspace.root / "corpus" / "docs.txt").write_text("Only a short text now, on one side of the split.\n")
    refused = cli("train", *sets, "--no-progress", code=1)
    side = re.search(r"no (training|validation) documents of 1", refused)  # one document: one side only
    assert side and "Traceback" not in refused, refused
    assert "run `lmops train` again" in refused
    assert f"FAILED ({side[0]}" in cli("data", "list")


def test_version_module_entry_point_and_completion():
    """`lmops --version` and `python -m lmops` as a real process (the module entry point is the process's own
    business); the completion options are in the help."""
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "lmops", "--version"], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"lmops {version('lmops')}", out.stderr
    helped = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert helped.exit_code == 0
    assert "--install-completion" in helped.output and "--show-completion" in helped.output
    assert "quickstart" in helped.output


def test_data_commands(workspace, cli):
    first = cli("data", "ingest")
    assert "documents" in first and "dataset " in first
    first_id = first.split("dataset ")[1][:12]
    (workspace.root / "corpus" / "more.txt").write_text("A second document, long enough to keep. " * 5)
    (workspace.root / "corpus" / "bad.txt").write_bytes(b"caf\xe9 " * 20)
    second = cli("data", "ingest")
    assert "quarantined" in second, second
    assert list((workspace.root / ".lmops" / "quarantine").rglob("bad.txt*"))
    listed = cli("data", "list")
    assert first_id in listed and second.split("dataset ")[1][:12] in listed
    assert "+1 documents" in cli("data", "diff", first_id, "latest")
    assert "min_documents" in cli("data", "ingest", "--set", "data.min_documents=100", code=1)


def test_keys_are_shown_once_and_stored_as_hashes(workspace, cli):
    from lmops.store import Store

    made = CliRunner().invoke(app, ["keys", "create", "frontend", "--role", "deployer", "-w", str(workspace.root)])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert secret.startswith("lmk_") and len(secret) > 40 and secret not in made.stderr, "the secret: stdout alone"
    listed = cli("keys", "list")
    assert "frontend" in listed and secret not in listed
    assert not any(secret.encode() in f.read_bytes() for f in workspace.state.glob("lmops.db*"))  # incl. the WAL
    cli("keys", "revoke", secret[:12])
    with Store.for_workspace(workspace) as store:
        assert store.keys.verify(secret) is None
    assert "inference, deployer, admin" in cli("keys", "create", "x", "--role", "root", code=1)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(workspace, tiny_sets, cli):
    """SIGINT to a real `lmops train` process (signals are the process's business), then --resume in this one."""
    import json
    import signal
    import time

    sets = [a for item in [*tiny_sets, "train.max_steps=100000"] for a in ("--set", item)]
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "train", "-w", str(workspace.root), *sets, "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    metrics = workspace.run_dir("main") / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.1)  # polling a condition, not synchronisation
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "interrupted at step" in err and "Traceback" not in err, err
    assert "`lmops train --run main --resume`" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    from lmops.checkpoint import Checkpoint

    assert Checkpoint(workspace.run_dir("main")).meta["step"] == step >= 3
    done = cli("train", *sets[:-2], "--set", f"train.max_steps={step + 2}", "--resume", "--no-progress")
    assert f"resuming main at step {step}" in done
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 2
