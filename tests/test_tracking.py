import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import TINY, tokenized
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.types import DataType
from safetensors import safe_open

from lmops import tracking
from lmops.checkpoint import Checkpoint
from lmops.config import override
from lmops.errors import LmopsError
from lmops.data.demo import demo_corpus
from lmops.data.dataset import Doc, doc_id, write_dataset
from lmops.sample import continuations
from lmops.tokenizer import load_meta, load_tokenizer
from lmops.train import train
from lmops.util import sha256_file
from lmops.workspace import init_workspace


def tokenizer_file(ws):
    """A stand-in tokenizer file for tests of tracking alone."""
    return ws.state / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained once inside a tracked run."""
    ws = init_workspace(tmp_path_factory.mktemp("tracking") / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    cfg = override(ws.config(), TINY)
    tokens = Path(tokenized(ws, cfg)["tokens_dir"])
    with tracking.start_training_run(ws, cfg, "ds-42", tokens / "tokenizer.json", "main") as run:
        result = train(cfg, tokens, ws.run_dir("main"), tokens, progress=False,
                       log=lambda m: None, on_metrics=run.log_row)
        uri = run.log_model(result.checkpoint)
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
    assert tags[tracking.TAG_CHECKPOINT_SHA] == sha256_file(ws.run_dir("main") / "ckpt.safetensors")

    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_bpb")) == [6, 12]
    assert {"lr", "tokens_per_s", "val_loss", "val_ppl"} <= set(run.data.metrics)
    assert "time" not in run.data.metrics and "step" not in run.data.metrics

    files = {f.path for d in ("config", "tokenizer", "checkpoint") for f in client.list_artifacts(run_id, d)}
    assert files == {"config/lmops.yaml", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    config_text = (ws.state / "mlartifacts" / run_id / "artifacts" / "config" / "lmops.yaml").read_text()
    assert "n_layer: 2" in config_text


def test_the_checkpoint_is_logged_as_an_mlflow_model(trained):
    """The run's model is a standard MLflow model: MLmodel with a pyfunc flavor from code (nothing
    pickled), signature and input example, weights only, the tokenizer; it loads and generates."""
    ws, cfg, tokens, run_id, model_uri = trained
    client = MlflowClient(tracking.tracking_uri(ws, cfg))
    run = client.get_run(run_id)
    model_id = run.data.tags[tracking.TAG_MODEL_ID]
    assert model_uri == f"models:/{model_id}"
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "model"
    assert model.tags[tracking.TAG_CHECKPOINT_SHA] == run.data.tags[tracking.TAG_CHECKPOINT_SHA]
    assert {m.key for m in model.metrics} >= {"loss", "val_bpb"}  # the run's metrics at the checkpoint's step

    tracking.configure(ws, cfg)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    meta = Model.load(local / "MLmodel")
    pyfunc = meta.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert pyfunc["model_code_path"].endswith("mlflow_model.py")
    assert "python_model" not in pyfunc and not list(local.rglob("*.pkl"))  # models from code: nothing pickled
    assert (local / "code" / "lmops" / "model.py").is_file()
    assert meta.signature.inputs.input_types() == [DataType.string]
    assert {p.name: p.default for p in meta.signature.params} == {"max_tokens": 64, "temperature": 0.8, "top_k": 0,
                                                                  "top_p": 1.0, "seed": 1337}
    assert meta.load_input_example(str(local)) is not None
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow==" in requirements and "+cpu" not in requirements

    weights = local / "artifacts" / "model" / "ckpt.safetensors"
    assert model.tags[tracking.TAG_WEIGHTS_SHA] == tracking.sha256_file(weights)
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("model.") for n in names)  # no optimizer, no RNG state
    assert Checkpoint(weights).meta["step"] == 12
    assert {p.name for p in weights.parent.iterdir()} == {"ckpt.safetensors", "tokenizer.json", "tokenizer_config.json"}

    loaded = mlflow.pyfunc.load_model(model_uri)
    params = {"max_tokens": 12, "seed": 1, "temperature": 0.9}
    texts = loaded.predict(pd.DataFrame({"prompt": ["The list", "A"]}), params=params)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert loaded.predict(["The list", "A"], params=params) == texts  # seeded: the same text
    greedy = loaded.predict(["The list"], params={"max_tokens": 12, "temperature": 0.0})
    assert greedy == loaded.predict(["The list"], params={"max_tokens": 12, "temperature": 0.0, "seed": 99})
    trained_model = Checkpoint(ws.run_dir("main") / "ckpt.safetensors").model()
    assert continuations(trained_model, load_tokenizer(ws.run_dir("main")), "The list", 12, temperature=0.9,
                         seed=1) == texts[:1]  # what lmops generate samples


def test_the_dataset_version_is_an_mlflow_input(workspace):
    cfg = workspace.config()
    tokenizer_file(workspace).parent.mkdir(parents=True)
    tokenizer_file(workspace).write_text("{}")
    text = "A document about lists. " * 20
    version = write_dataset([Doc(doc_id(text), text, "corpus/docs.txt")], {"sources": []}, workspace.state, 0.0, None)
    with tracking.start_training_run(workspace, cfg, version.id, tokenizer_file(workspace), "main") as run:
        run.log_row({"step": 1, "loss": 3.0})
    got = MlflowClient(tracking.tracking_uri(workspace, cfg)).get_run(run.run_id)
    (item,) = got.inputs.dataset_inputs
    assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": "training", "lmops.dataset_id": version.id}
    assert item.dataset.name == version.short_id and item.dataset.digest == version.id[:36]
    assert json.loads(item.dataset.source) == {"uri": str(version.path)} and item.dataset.source_type == "local"
    assert tracking.training_dataset(got) == {"id": version.id, "name": version.short_id, "digest": version.id[:36],
                                              "source": str(version.path)}


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
    (tokenizer_file(workspace).parent).mkdir(parents=True)
    tokenizer_file(workspace).write_text("{}")
    with pytest.raises(RuntimeError):
        with tracking.start_training_run(workspace, cfg, None, tokenizer_file(workspace), "it's") as run:
            run.log_row({"step": 1, "loss": 3.0})
            raise RuntimeError("boom")
    client = MlflowClient(tracking.tracking_uri(workspace, cfg))
    first = client.get_run(run.run_id)
    assert first.info.status == "FAILED" and first.data.metrics["loss"] == 3.0
    assert tracking.TAG_DATASET not in first.data.tags

    changed = override(cfg, ["train.max_steps=5000"])
    with tracking.start_training_run(workspace, changed, None, tokenizer_file(workspace), "it's", resume=True) as again:
        again.log_row({"step": 2, "loss": 2.5})
    assert again.run_id == run.run_id
    resumed = client.get_run(run.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params["train.max_steps"] == "2000"  # params are immutable: the first value stays
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]

    with tracking.start_training_run(workspace, cfg, None, tokenizer_file(workspace), "it's") as fresh:
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
    with tracking.start_training_run(workspace, workspace.config(), None, tokenizer_file(workspace), "main") as run:
        run.log_row({"step": 1, "loss": 1.0})
        assert run.log_model(workspace.run_dir("main") / "ckpt.safetensors") == ""
    assert run.run_id == "" and not (workspace.state / "mlflow.db").exists()


def test_a_refused_resume_leaves_the_finished_run_as_it_was(workspace):
    """`lmops train --resume` refused before any step (checkpoint and config do not match) must not
    mark the finished run FAILED, nor touch its tags or config."""
    cfg = workspace.config()
    tokenizer_file(workspace).parent.mkdir(parents=True)
    tokenizer_file(workspace).write_text("{}")
    with tracking.start_training_run(workspace, cfg, None, tokenizer_file(workspace), "main") as run:
        run.log_row({"step": 1, "loss": 3.0})
    client = MlflowClient(tracking.tracking_uri(workspace, cfg))
    before = client.get_run(run.run_id)
    tokenizer_file(workspace).write_text('{"changed": true}')
    with pytest.raises(LmopsError, match="does not match"):
        with tracking.start_training_run(workspace, override(cfg, ["model.n_layer=3"]), None, tokenizer_file(workspace),
                                         "main", resume=True) as again:
            raise LmopsError("the checkpoint does not match the config")  # what check_resumable raises
    assert again.run_id == run.run_id
    after = client.get_run(run.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags
    config = (workspace.state / "mlartifacts" / run.run_id / "artifacts" / "config" / "lmops.yaml").read_text()
    assert "n_layer: 3" not in config


def test_a_resumed_run_logs_each_step_once(workspace):
    """Resumed from its step-2 checkpoint after a crash at step 4, training re-does steps 3 and 4:
    MLflow already has them, so they are not logged twice."""
    cfg = workspace.config()
    tokenizer_file(workspace).parent.mkdir(parents=True)
    tokenizer_file(workspace).write_text("{}")
    with pytest.raises(RuntimeError):
        with tracking.start_training_run(workspace, cfg, None, tokenizer_file(workspace), "main") as run:
            for step in range(1, 5):
                run.log_row({"step": step, "loss": 10.0 - step, **({"val_loss": 9.0} if step == 2 else {})})
            raise RuntimeError("killed")
    with tracking.start_training_run(workspace, cfg, None, tokenizer_file(workspace), "main", resume=True) as again:
        for step in range(3, 7):
            again.log_row({"step": step, "loss": 10.0 - step, **({"val_loss": 8.0} if step == 4 else {})})
    assert again.run_id == run.run_id
    client = MlflowClient(tracking.tracking_uri(workspace, cfg))
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val_loss")] == [(2, 9.0), (4, 8.0)]
    assert client.get_run(run.run_id).info.status == "FINISHED"


# Loads an MLflow model folder in a Python that cannot import lmops (as a deployment target without
# it installed), predicts, prints the texts and where lmops came from.
WITHOUT_LMOPS = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
assert importlib.util.find_spec("lmops") is None, "lmops is importable"
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
texts = model.predict(["The list"], params={"max_tokens": 12, "seed": 1, "temperature": 0.9})
print(json.dumps({"texts": texts, "lmops": sys.modules["lmops"].__file__}))
"""


def test_the_model_runs_where_lmops_is_not_installed(trained, tmp_path):
    """The model carries the lmops code it runs (code_paths): a machine with MLflow and the pip
    requirements, but not lmops, loads and runs it."""
    ws, cfg, tokens, run_id, model_uri = trained
    tracking.configure(ws, cfg)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "download")))
    out = subprocess.run([sys.executable, "-c", WITHOUT_LMOPS, str(local)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["lmops"].startswith(str(local / "code" / "lmops"))
    assert got["texts"] == mlflow.pyfunc.load_model(model_uri).predict(
        ["The list"], params={"max_tokens": 12, "seed": 1, "temperature": 0.9})


def test_a_model_logged_during_training_links_the_metrics_still_buffered(trained):
    """tracking.log_model(run_id, ...) inside start_training_run (as lmops.stages.train calls it)
    sends the buffered rows first, so the model links the metrics of its step."""
    ws, cfg = trained[0], trained[1]
    with tracking.start_training_run(ws, cfg, None, trained[2] / "tokenizer.json", "buffered") as run:
        run.log_row({"step": 12, "loss": 1.5, "val_bpb": 2.5})  # buffered: FLUSH_ROWS rows not reached
        uri = tracking.log_model(run.run_id, ws.run_dir("main") / "ckpt.safetensors")
    model = MlflowClient(tracking.tracking_uri(ws, cfg)).get_logged_model(uri.removeprefix("models:/"))
    assert {(m.key, m.value, m.step) for m in model.metrics} == {("loss", 1.5, 12), ("val_bpb", 2.5, 12)}
