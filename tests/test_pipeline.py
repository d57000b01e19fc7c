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
        runs = store.list_pipeline_runs(20)
        assert [r.status for r in runs][:3] == ["succeeded", "succeeded", "failed"]
        failed = runs[2]
        assert "min_documents" in failed.error and [s.status for s in failed.steps][-1] == "failed"
        actions = [e.action for e in store.list_audit(200)]
        assert {"dataset.created", "model.registered", "model.alias_set", "model.promoted"} <= set(actions)
        assert store.verify_audit().ok


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
    with Store.for_workspace(ws, cfg) as store, store.pipeline_lock():
        with pytest.raises(LmopsError, match="another pipeline run"):
            run_pipeline(ws, cfg, log=quiet)


def test_steps_must_have_their_inputs(pipeline_ws):
    cfg = override(pipeline_ws.config(), [*PIPELINE, "pipeline.steps=[ingest, train]"])
    with pytest.raises(LmopsError, match="'train' needs 'tokenize'"):
        run_pipeline(pipeline_ws, cfg, log=quiet)
