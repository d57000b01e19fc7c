import pytest
from conftest import TINY
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lmops import tracking
from lmops.config import override
from lmops.data.corpus import demo_corpus
from lmops.data.prepare import prepare
from lmops.tokenizer import load_meta
from lmops.train import train
from lmops.workspace import init_workspace


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained once inside a tracked run."""
    ws = init_workspace(tmp_path_factory.mktemp("tracking") / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    cfg = override(ws.config(), TINY)
    tokens = prepare(ws, cfg, log=lambda m: None)
    with tracking.start_training_run(ws, cfg, "ds-42", ws.tokenizer_path, "main") as run:
        result = train(cfg, tokens, ws.run_dir("main"), ws.tokenizer_path.parent, progress=False,
                       log=lambda m: None, on_metrics=run.log_row)
        uri = run.log_checkpoint(result.checkpoint)
    return ws, cfg, tokens, run.run_id, uri


def test_training_run_is_tracked(trained):
    ws, cfg, tokens, run_id, ckpt_uri = trained
    assert (ws.state / "mlflow.db").is_file()
    client = MlflowClient(tracking.tracking_uri(ws, cfg))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "main"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "lmops" and exp.artifact_location == (ws.state / "mlartifacts").as_uri()

    params = run.data.params
    assert params["model.n_layer"] == "2" and params["tokenizer.kind"] == "char" and params["train.lr"] == "0.003"
    assert params["data.corpus"] == '["corpus"]' and params["model.n_kv_head"] == "null"
    assert len(params) == len(tracking.flatten_config(cfg))

    tags = run.data.tags
    assert tags[tracking.TAG_DATASET] == "ds-42"
    assert tags[tracking.TAG_TOKENIZER] == load_meta(tokens)["tokenizer_sha256"]
    assert tags[tracking.TAG_VERSION] == tracking.lmops_version()
    commit = tags[tracking.TAG_GIT_COMMIT]
    assert commit == "unknown" or len(commit) == 40
    assert tags["mlflow.source.git.commit"] == commit
    assert tags[tracking.TAG_CHECKPOINT_STEP] == "12"
    assert tags[tracking.TAG_CHECKPOINT_SHA] == tracking.file_sha256(ws.run_dir("main") / "ckpt.safetensors")

    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_bpb")) == [6, 12]
    assert {"lr", "tokens_per_s", "val_loss", "val_ppl"} <= set(run.data.metrics)
    assert "time" not in run.data.metrics and "step" not in run.data.metrics

    files = {f.path for d in ("config", "tokenizer", "checkpoint") for f in client.list_artifacts(run_id, d)}
    assert files == {"config/lmops.yaml", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                     "checkpoint/ckpt.safetensors", "checkpoint/tokenizer.json", "checkpoint/tokenizer_config.json"}
    assert ckpt_uri == f"{run.info.artifact_uri}/checkpoint"
    config_text = (ws.state / "mlartifacts" / run_id / "artifacts" / "config" / "lmops.yaml").read_text()
    assert "n_layer: 2" in config_text


class FakeClient:
    def __init__(self, fail_first: bool = False):
        self.calls, self.fail = [], fail_first

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.fail:
            self.fail = False
            raise MlflowException("server down")
        self.calls.append(list(metrics))


def test_metrics_are_sent_in_batches_off_the_training_thread():
    client = FakeClient()
    run = tracking.TrainingRun("r", client)
    for step in range(1, 121):
        run.log_row({"step": step, "loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0, "time": 0.1})
    run.close()
    sent = [m for call in client.calls for m in call]
    assert len(sent) == 120 * 3 and [m.step for m in sent[::3]] == list(range(1, 121))  # all, in order
    assert 1 <= len(client.calls) <= 4, "batched, not a request per step"


def test_a_failed_send_keeps_the_metrics_for_the_next(capsys):
    client = FakeClient(fail_first=True)
    said = []
    run = tracking.TrainingRun("r", client, log=said.append)
    run.log_row({"step": 1, "loss": 2.0})
    run._send()  # what the sender thread does every FLUSH_SECONDS, called here to control the timing
    assert client.calls == [] and len(run.pending) == 1 and "server down" in said[0]
    run.close()
    assert [(m.key, m.value, m.step) for m in client.calls[0]] == [("loss", 2.0, 1)]


def test_failed_training_marks_the_run_failed_and_resume_continues_it(workspace):
    cfg = workspace.config()
    (workspace.tokenizer_path.parent).mkdir(parents=True)
    workspace.tokenizer_path.write_text("{}")
    with pytest.raises(RuntimeError):
        with tracking.start_training_run(workspace, cfg, None, workspace.tokenizer_path, "it's") as run:
            run.log_row({"step": 1, "loss": 3.0})
            raise RuntimeError("boom")
    client = MlflowClient(tracking.tracking_uri(workspace, cfg))
    first = client.get_run(run.run_id)
    assert first.info.status == "FAILED" and first.data.metrics["loss"] == 3.0
    assert tracking.TAG_DATASET not in first.data.tags

    changed = override(cfg, ["train.max_steps=5000"])
    with tracking.start_training_run(workspace, changed, None, workspace.tokenizer_path, "it's", resume=True) as again:
        again.log_row({"step": 2, "loss": 2.5})
    assert again.run_id == run.run_id
    resumed = client.get_run(run.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params["train.max_steps"] == "2000"  # params are immutable: the first value stays
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]

    with tracking.start_training_run(workspace, cfg, None, workspace.tokenizer_path, "it's") as fresh:
        pass
    assert fresh.run_id != run.run_id


def test_configure_uses_a_given_uri(workspace, tmp_path):
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    cfg = override(workspace.config(), [f"tracking.tracking_uri={uri}", "tracking.experiment=exp2"])
    assert tracking.configure(workspace, cfg) == uri
    assert (tmp_path / "other.db").is_file() and not (workspace.state / "mlflow.db").exists()
    assert MlflowClient(uri).get_experiment_by_name("exp2") is not None


def test_only_rank_zero_tracks(workspace, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # another process of a torchrun
    with tracking.start_training_run(workspace, workspace.config(), None, workspace.tokenizer_path, "main") as run:
        run.log_row({"step": 1, "loss": 1.0})
        assert run.log_checkpoint(workspace.run_dir("main") / "ckpt.safetensors") == ""
    assert run.run_id == "" and not (workspace.state / "mlflow.db").exists()
