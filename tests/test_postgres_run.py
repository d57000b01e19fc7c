"""The metadata store on PostgreSQL for a whole run, not only its unit tests: the pipeline (ingest ->
... -> promote, its audit entries), then a real server of the champion answering a real openai client,
its key checked and its request logged in PostgreSQL, and no SQLite store file made on the side.
(The store's own tests run on both databases: tests/conftest.py's `url` fixture.)"""

from __future__ import annotations

import pytest

from conftest import TINY
from lmops.config import override
from lmops.store import DB_FILE, Store


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_a_pipeline_and_a_server_run_on_postgresql(workspace, url):
    import openai

    from lmops.pipeline import run_pipeline
    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from serve.conftest import LiveServer

    ws = workspace
    cfg = override(ws.config(), [*TINY, f"store.database_url={url}", "registry.model_name=pgrun"])
    run_pipeline(ws, cfg, progress=False, log=lambda m: None)
    with Store.for_workspace(ws, cfg) as store:
        assert store.url.startswith("postgresql")
        actions = {e.action for e in store.audit.list(200)}
        assert {"model.registered", "model.promoted"} <= actions, actions
        assert store.pipeline.list_runs(1)[0].status == "succeeded"
        assert store.audit.verify().ok
        _, secret = store.keys.create("pg client", "inference", "tests")
        live = LiveServer(create_app(cfg, ModelSource(ws, cfg, "pgrun@champion"), store))
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=secret)
            answer = client.completions.create(model="pgrun", prompt="The ", max_tokens=4)
            assert answer.usage.completion_tokens >= 1
        finally:
            live.stop()
        rows = store.requests.list(10)
        assert rows and rows[0].status_code == 200 and rows[0].route == "/v1/completions"
    assert not (ws.state / DB_FILE).exists(), "a SQLite store was made beside PostgreSQL"
