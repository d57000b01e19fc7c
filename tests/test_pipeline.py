"""The pipeline end to end on a real workspace: SQLite store, MLflow on SQLite, a tiny model."""

import pytest

from lmops.config import override
from lmops.data.demo import demo_documents
from lmops.errors import LmopsError
from lmops.pipeline import STEPS, run_pipeline
from lmops.store import Store

PIPELINE = [
    "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.block_size=32", "tokenizer.kind=char",
    "train.batch_size=4", "train.max_steps=6", "train.warmup_steps=1", "train.eval_interval=6", "train.eval_batches=2",
    "train.dtype=float32", "evaluate.max_new_tokens=8",
]


@pytest.fixture
def pipeline_ws(workspace):
    (workspace.root / "corpus" / "docs.txt").unlink()
    for i, text in enumerate(list(demo_documents().values())[:30]):
        (workspace.root / "corpus" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return workspace


def quiet(msg: str) -> None:
    pass


def test_pipeline_caches_resumes_and_records_everything(pipeline_ws):
    ws = pipeline_ws
    cfg = override(ws.config(), PIPELINE)

    first = run_pipeline(ws, cfg, log=quiet)
    assert first.ran == list(STEPS) and first.cached == []
    assert first.outputs["promote"]["champion"] == first.outputs["register"]["version"] == "1"

    again = run_pipeline(ws, cfg, log=quiet)
    assert again.ran == [] and again.cached == list(STEPS), "an unchanged pipeline must skip every step"

    more_steps = override(cfg, ["train.max_steps=8"])
    changed = run_pipeline(ws, more_steps, log=quiet)
    assert changed.cached == ["ingest", "validate", "tokenize"]
    assert changed.ran == ["train", "evaluate", "register"] + (["promote"] if "promote" in changed.ran else [])

    # a new document changes the dataset: everything downstream runs again
    (ws.root / "corpus" / "extra.txt").write_text(list(demo_documents().values())[40], encoding="utf-8")
    failing = override(more_steps, ["data.min_documents=1000"])
    with pytest.raises(LmopsError, match="pipeline step 'validate' failed: data gates failed"):
        run_pipeline(ws, failing, log=quiet)
    resumed = run_pipeline(ws, more_steps, log=quiet)
    assert resumed.cached == ["ingest"], "the ingest done before the failure is reused"
    assert resumed.ran[:3] == ["validate", "tokenize", "train"]

    forced = run_pipeline(ws, more_steps, from_step="evaluate", log=quiet)
    assert forced.cached == ["ingest", "validate", "tokenize", "train"] and forced.ran[0] == "evaluate"

    with Store.for_workspace(ws, cfg) as store:
        runs = store.pipeline.list_runs(20)
        assert [r.status for r in runs][:3] == ["succeeded", "succeeded", "failed"]
        failed = runs[2]
        assert "min_documents" in failed.error and [s.status for s in failed.steps][-1] == "failed"
        actions = [e.action for e in store.audit.list(200)]
        assert {"dataset.created", "model.registered", "model.alias_set", "model.promoted"} <= set(actions)
        assert store.audit.verify().ok


def test_lineage_from_alias_to_corpus(pipeline_ws):
    from lmops import registry

    ws = pipeline_ws
    cfg = override(ws.config(), PIPELINE)
    result = run_pipeline(ws, cfg, log=quiet)
    lin = registry.lineage(ws, cfg, "@champion")
    flat = repr(lin)
    assert result.outputs["ingest"]["dataset"][:12] in flat
    assert result.outputs["train"]["mlflow_run_id"] in flat
    assert result.outputs["tokenize"]["tokenizer_sha256"][:12] in flat


def test_second_pipeline_on_the_same_workspace_is_refused(pipeline_ws):
    ws = pipeline_ws
    cfg = override(ws.config(), PIPELINE)
    with Store.for_workspace(ws, cfg) as store, store.pipeline.lock():
        with pytest.raises(LmopsError, match="another pipeline run"):
            run_pipeline(ws, cfg, log=quiet)


def test_steps_must_have_their_inputs(pipeline_ws):
    cfg = override(pipeline_ws.config(), [*PIPELINE, "pipeline.steps=[ingest, train]"])
    with pytest.raises(LmopsError, match="'train' needs 'tokenize'"):
        run_pipeline(pipeline_ws, cfg, log=quiet)


def test_a_step_failing_with_a_bug_is_marked_failed_and_keeps_its_traceback(pipeline_ws, monkeypatch):
    from lmops import pipeline

    def broken(ctx):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setitem(pipeline.RUN, "tokenize", broken)
    cfg = override(pipeline_ws.config(), PIPELINE)
    with pytest.raises(RuntimeError, match="a bug"):
        run_pipeline(pipeline_ws, cfg, log=quiet)
    with Store.for_workspace(pipeline_ws, cfg) as store:
        run = store.pipeline.list_runs(1)[0]
        assert run.status == "failed" and run.error == "tokenize: RuntimeError: a bug"
        assert [(s.name, s.status) for s in run.steps][-1] == ("tokenize", "failed")


def test_an_interrupted_pipeline_run_says_to_run_the_pipeline_again(pipeline_ws, cli, monkeypatch):
    """Ctrl-C in training (the Interrupted error training raises once its checkpoint is saved) or anywhere else
    in a step: the advice is the pipeline's command, not `lmops train`'s, and the step and run are failed."""
    import lmops.train
    from lmops.errors import Interrupted

    def ctrl_c_in_training(*args, **kwargs):
        raise Interrupted("interrupted at step 3; checkpoint saved to ckpt.safetensors")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    sets = [a for item in [*PIPELINE, "pipeline.steps=[ingest, validate, tokenize, train]"] for a in ("--set", item)]
    for stop, said in ((ctrl_c_in_training, "interrupted at step 3"), (ctrl_c, "interrupted")):
        monkeypatch.setattr(lmops.train, "train", stop)
        out = cli("pipeline", "run", *sets, code=1)
        assert f"pipeline step 'train' failed: {said};" in out, out
        assert "run `lmops pipeline run` again" in out and "training resumes from its checkpoint" in out, out
        assert "lmops train" not in out, out
    with Store.for_workspace(pipeline_ws, override(pipeline_ws.config(), PIPELINE)) as store:
        runs = store.pipeline.list_runs(2)
        assert [r.status for r in runs] == ["failed", "failed"] and runs[0].steps[-1].status == "failed"


def test_a_killed_run_shows_as_gone_and_the_next_run_closes_it_and_resumes_training(pipeline_ws):
    import os
    import signal
    import subprocess
    import sys
    import time

    ws = pipeline_ws
    sets = [*PIPELINE, "train.max_steps=2000", "train.checkpoint_interval=10", "train.eval_interval=1000"]
    args = [a for item in sets for a in ("--set", item)]
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "pipeline", "run", "-w", str(ws.root), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(ws.runs_dir.glob("pipeline-*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 25:  # past the checkpoint at step 20
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, f"training never got going: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else None}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first_process_rows = len(metrics.read_text().splitlines())
    cli = [sys.executable, "-m", "lmops"]
    env = {**os.environ, "COLUMNS": "200"}
    listed = subprocess.run([*cli, "pipeline", "list", "-w", str(ws.root)], capture_output=True, text=True, env=env)
    assert "gone (its process died)" in listed.stderr, listed.stderr
    logs = []
    result = run_pipeline(ws, override(ws.config(), sets), log=logs.append)
    assert any("was left running by a process that is gone: marked failed" in m for m in logs)
    assert result.cached == ["ingest", "validate", "tokenize"] and result.ran[0] == "train"
    with Store.for_workspace(ws) as store:
        runs = store.pipeline.list_runs(2)
        assert [r.status for r in runs] == ["succeeded", "failed"] and "process is gone" in runs[1].error
        assert [s.status for s in runs[1].steps][-1] == "failed"
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    # the second process began where the first one's rows end; the kill can land just after a checkpoint,
    # so its first step may follow the last one logged, or repeat the steps since the last checkpoint
    before, resumed = steps[first_process_rows - 1], steps[first_process_rows]
    assert resumed % 10 == 1 and 20 < resumed <= before + 1, (before, resumed)
    assert steps[-1] == 2000
