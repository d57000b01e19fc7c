import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import TINY, tokenized
from mlflow import MlflowClient
from rich.console import Console
from safetensors import safe_open

from lmops import registry, tracking
from lmops.checkpoint import Checkpoint, save_checkpoint
from lmops.config import override
from lmops.data.demo import demo_corpus
from lmops.errors import LmopsError
from lmops.evaluate import check_gates, evaluate_checkpoint, log_evaluation
from lmops.sample import continuations
from lmops.tokenizer import load_meta, load_tokenizer
from lmops.train import train
from lmops.workspace import init_workspace


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tracked, evaluated tiny model; each test registers it under its own model name."""
    ws = init_workspace(tmp_path_factory.mktemp("registry") / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    cfg = override(ws.config(), TINY + ["evaluate.max_new_tokens=16"])
    tokens = Path(tokenized(ws, cfg)["tokens_dir"])
    with tracking.start_training_run(ws, cfg, "ds-7", tokens / "tokenizer.json", "main") as run:
        result = train(cfg, tokens, ws.run_dir("main"), tokens, progress=False,
                       log=lambda m: None, on_metrics=run.log_row)
    results = evaluate_checkpoint(result.checkpoint, tokens, cfg)
    return ws, cfg, tokens, run.run_id, result.checkpoint, results


class Audit:
    def __init__(self):
        self.calls = []

    def __call__(self, action, subject, details, reason):
        self.calls.append((action, subject, details, reason))

    def actions(self):
        return [c[0] for c in self.calls]


def setup(trained, name, *sets):
    ws, cfg, tokens, run_id, ckpt, results = trained
    cfg = override(cfg, [f"registry.model_name={name}", *sets])
    return ws, cfg, run_id, ckpt, results


def register(ws, cfg, run_id, ckpt, results, champion=None, audit=None):
    gates = check_gates(results, cfg.evaluate.gates, champion)
    return registry.register(ws, cfg, run_id, ckpt, results, gates, "ds-7", audit)


def client(ws, cfg):
    uri = tracking.tracking_uri(ws, cfg)
    return MlflowClient(uri, uri)


def variant(trained, key):
    """Another checkpoint of the run (the same weights, other bytes): registration is idempotent per
    run and checkpoint, so a test that needs a second version registers one of these."""
    ws, ckpt = trained[0], trained[4]
    source = Checkpoint(ckpt)
    path = save_checkpoint(ws.root / "variants" / key / "ckpt.safetensors", source.model(),
                           meta=source.meta | {"variant": key})
    for name in tracking.TOKENIZER_FILES:
        shutil.copy(ckpt.parent / name, path.parent / name)
    return path


def test_register_tags_the_version_and_aliases_it_challenger(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "reg")
    audit = Audit()
    assert register(ws, cfg, run_id, ckpt, results, audit=audit) == "1"
    c = client(ws, cfg)
    mv = c.get_model_version_by_alias("reg", "challenger")
    assert str(mv.version) == "1" and mv.run_id == run_id
    run = c.get_run(run_id)
    tags = mv.tags
    model_id = tags["lmops.model_id"]
    assert model_id == run.data.tags["lmops.model_id"] and mv.source == f"models:/{model_id}"  # an MLflow model
    assert tags["lmops.dataset_id"] == "ds-7" and tags["run_id"] == run_id and tags["gates"] == "passed"
    assert tags["lmops.git_commit"] == run.data.tags["lmops.git_commit"]
    assert tags["lmops.checkpoint_sha256"] == tracking.sha256_file(ckpt)
    assert tags["lmops.weights_sha256"] == c.get_logged_model(model_id).tags["lmops.weights_sha256"]
    assert tags["model_card"].endswith("model_cards/reg-v1.md") and tags["lmops.registration"] == "complete"
    assert not [k for k in tags if k.startswith("eval.")]  # the evaluation is metrics, not string tags
    metrics = registry.eval_metrics(mv, c)
    assert metrics["val_bpb"] == results["val_bpb"] and metrics["safety_pass_rate"] == 1.0
    assert audit.actions() == ["model.registered", "model.alias_set"]
    assert audit.calls[0][2]["model_uri"] == mv.source
    assert audit.calls[1][1:3] == ("model:reg/1", {"alias": "challenger", "from": None, "to": "1"})

    # the same run and checkpoint again: the same version, nothing new
    assert register(ws, cfg, run_id, ckpt, results, audit=audit) == "1" and len(audit.calls) == 2
    assert len(c.search_model_versions("name = 'reg'")) == 1

    # another checkpoint of the run; gate results as a pipeline stores them (JSON dicts) work too
    gates = [g.__dict__ for g in check_gates(results, cfg.evaluate.gates, None)]
    assert registry.register(ws, cfg, run_id, variant(trained, "reg-2"), results, gates, None) == "2"
    assert c.get_model_version("reg", "2").tags["lmops.dataset_id"] == "ds-7"  # the run's, when not given
    assert str(c.get_model_version_by_alias("reg", "challenger").version) == "2"


def test_model_card(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "card", "evaluate.gates={bar: 'val_bpb <= 0.5'}")
    version = register(ws, cfg, run_id, ckpt, results)
    mv = client(ws, cfg).get_model_version("card", version)
    assert mv.tags["gates"] == "failed" and mv.tags["gates.failed"] == "bar"
    path = ws.state / "mlartifacts" / run_id / "artifacts" / "model_cards" / "card-v1.md"
    card = path.read_text()
    assert card == mv.description
    meta = load_meta(trained[2])
    for expected in ("# card v1", "## Lineage", run_id, "`ds-7`", meta["tokenizer_sha256"], "## Evaluation",
                     f"| val_bpb | {results['val_bpb']:.6g} |", "## Gates", "| bar | val_bpb <= |", "**FAIL**",
                     "## Intended use", "## Limitations", "## Training", "2 layers, width 32, 2 heads, context 32",
                     "tokenizer: char", "12 steps, batch 4 x 1, lr 0.003"):
        assert expected in card, expected


def test_promote_moves_the_champion_and_audits(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "prom")
    assert registry.champion_metrics(ws, cfg) is None  # no registered model yet
    register(ws, cfg, run_id, ckpt, results)
    assert registry.champion_metrics(ws, cfg) is None  # registered, not promoted
    audit = Audit()
    assert registry.promote(ws, cfg, audit=audit) == "1"
    assert registry.champion_metrics(ws, cfg)["val_bpb"] == results["val_bpb"]
    c = client(ws, cfg)
    assert str(c.get_model_version_by_alias("prom", "champion").version) == "1"
    action, subject, details, reason = audit.calls[-1]
    assert (action, subject, reason) == ("model.promoted", "model:prom/1", None)
    assert details["alias"] == "champion" and details["from"] is None and details["gates"]["no_regression"]

    register(ws, cfg, run_id, variant(trained, "prom-2"), results)  # as good as the champion: passes no_regression
    assert registry.promote(ws, cfg, audit=audit) == "2"
    assert audit.calls[-1][2]["from"] == "1" and audit.calls[-1][2]["previous_champion"] == "1"
    assert str(c.get_model_version_by_alias("prom", "champion").version) == "2"
    n = len(audit.calls)
    assert registry.promote(ws, cfg, "champion", audit=audit) == "2" and len(audit.calls) == n  # nothing to do


def test_a_failing_gate_blocks_promotion_until_forced(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "gate")
    register(ws, cfg, run_id, ckpt, results)
    registry.promote(ws, cfg)
    worse = dict(results, val_bpb=results["val_bpb"] * 1.5)
    register(ws, cfg, run_id, variant(trained, "gate-2"), worse, champion=results)
    audit = Audit()
    with pytest.raises(LmopsError, match=r"gate v2 not promoted, gates failed \(no_regression: .* off by .*\); "
                                         r"champion stays v1"):
        registry.promote(ws, cfg, audit=audit)
    c = client(ws, cfg)
    assert str(c.get_model_version_by_alias("gate", "champion").version) == "1" and audit.calls == []
    with pytest.raises(LmopsError, match="needs a reason"):
        registry.promote(ws, cfg, force_reason=" ")

    assert registry.promote(ws, cfg, audit=audit, force_reason="bpb regression accepted for a new tokenizer") == "2"
    assert audit.actions() == ["model.gate_overridden", "model.promoted"]
    override_call = audit.calls[0]
    assert override_call[3] == "bpb regression accepted for a new tokenizer"
    assert "no_regression" in override_call[2]["failed"]
    assert str(c.get_model_version_by_alias("gate", "champion").version) == "2"
    assert c.get_model_version("gate", "2").tags["gate_override"].startswith("bpb regression")


def test_relative_gates_are_checked_against_the_current_champion(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "recheck")
    register(ws, cfg, run_id, variant(trained, "recheck-1"), dict(results, val_bpb=5.0))  # v1
    register(ws, cfg, run_id, variant(trained, "recheck-2"), dict(results, val_bpb=4.0))  # v2, passed: no champion
    registry.promote(ws, cfg, "1")
    registry.promote(ws, cfg, "2")  # better than the champion v1
    register(ws, cfg, run_id, variant(trained, "recheck-3"), dict(results, val_bpb=4.5))  # v3, judged at
    # registration without a champion
    assert client(ws, cfg).get_model_version("recheck", "3").tags["gates"] == "passed"
    with pytest.raises(LmopsError, match=r"no_regression: 4.5 fails <= 4.04 \(champion 4 \* 1.01\)"):
        registry.promote(ws, cfg, "3")


def test_approval_required(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "appr", "registry.require_approval=true",
                                           "registry.approvers=[alice, carol]")
    register(ws, cfg, run_id, ckpt, results)
    with pytest.raises(LmopsError, match=r"appr v1 needs approval by one of alice, carol"):
        registry.promote(ws, cfg)
    with pytest.raises(LmopsError, match=r"'bob' may not approve: registry.approvers is alice, carol"):
        registry.approve(ws, cfg, "1", "bob")
    audit = Audit()
    assert registry.approve(ws, cfg, "1", "alice", audit=audit) == "1"
    assert audit.calls == [("model.approved", "model:appr/1", {"approver": "alice", "gates": "passed"}, None)]
    assert registry.promote(ws, cfg, audit=audit) == "1"
    assert str(client(ws, cfg).get_model_version_by_alias("appr", "champion").version) == "1"

    # an approval by someone no longer on the list does not count
    register(ws, cfg, run_id, variant(trained, "appr-2"), results)
    registry.approve(ws, cfg, "2", "carol")
    fewer = override(cfg, ["registry.approvers=[alice]"])
    with pytest.raises(LmopsError, match="needs approval by one of alice"):
        registry.promote(ws, fewer)


def test_resolve_references(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "res")
    with pytest.raises(LmopsError, match=r"no registered model 'res'"):
        registry.resolve(ws, cfg, "champion")
    register(ws, cfg, run_id, ckpt, results)
    register(ws, cfg, run_id, variant(trained, "res-2"), results)
    registry.promote(ws, cfg, "1")
    for ref, version in [("res@champion", "1"), ("res@2", "2"), ("@challenger", "2"), ("1", "1"), ("v2", "2"),
                         ("champion", "1"), ("models:/res/2", "2"), ("models:/res@champion", "1")]:
        assert str(registry.resolve(ws, cfg, ref).version) == version, ref
    with pytest.raises(LmopsError, match=r"res@best: no such alias \(aliases: challenger \(v2\), champion \(v1\)\)"):
        registry.resolve(ws, cfg, "best")
    with pytest.raises(LmopsError, match="res has no version 9"):
        registry.resolve(ws, cfg, "9")


def test_lineage(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "lin")
    register(ws, cfg, run_id, ckpt, results)
    registry.promote(ws, cfg)
    lin = registry.lineage(ws, cfg, "champion")
    run = client(ws, cfg).get_run(run_id)
    assert lin["model"]["name"] == "lin" and lin["model"]["version"] == "1"
    assert lin["model"]["aliases"] == ["challenger", "champion"] and lin["model"]["gates"] == "passed"
    assert lin["run"] == {"id": run_id, "name": "main", "status": "FINISHED", "experiment_id": run.info.experiment_id,
                          "checkpoint_step": "12"}
    assert lin["dataset"] == {"id": "ds-7"}
    assert lin["tokenizer"] == {"sha256": load_meta(trained[2])["tokenizer_sha256"]}
    assert lin["code"]["git_commit"] == run.data.tags["lmops.git_commit"]
    assert lin["code"]["lmops_version"] == tracking.lmops_version()
    assert lin["eval"]["val_bpb"] == pytest.approx(results["val_bpb"])
    console = Console(record=True, width=200)
    console.print(registry.render_lineage(lin))
    text = console.export_text()
    for expected in ("lin v1 @challenger, @champion", f"run main {run_id}", "dataset ds-7",
                     f"tokenizer sha256 {lin['tokenizer']['sha256'][:16]}", f"code git {lin['code']['git_commit'][:12]}"):
        assert expected in text, expected


def test_download_checkpoint(trained, capfd):
    ws, cfg, run_id, ckpt, results = setup(trained, "dl")
    register(ws, cfg, run_id, ckpt, results)
    capfd.readouterr()
    path = registry.download_checkpoint(ws, cfg, "dl@challenger")
    assert "Downloading artifacts" not in capfd.readouterr().err  # no MLflow progress bar
    assert path == ws.state / "models" / "dl" / "1" / "ckpt.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("model.") for k in f.keys())  # weights only: no optimizer, no RNG state
    assert path.stat().st_size < ckpt.stat().st_size
    served, trained_model = Checkpoint(path).model(), Checkpoint(ckpt).model()
    assert all(torch.equal(a, b) for a, b in zip(served.state_dict().values(), trained_model.state_dict().values()))
    assert Checkpoint(path).meta["step"] == Checkpoint(ckpt).meta["step"]
    assert load_tokenizer(path.parent).get_vocab_size() == load_meta(trained[2])["vocab_size"]
    assert registry.download_checkpoint(ws, cfg, "1") == path  # downloaded once

    register(ws, cfg, run_id, variant(trained, "dl-2"), results)
    uri = client(ws, cfg).get_model_version_download_uri("dl", "2")
    artifact = Path(uri.removeprefix("file://")) / "artifacts" / "model" / "ckpt.safetensors"
    good = artifact.read_bytes()
    try:
        artifact.write_bytes(good[:-1] + b"!")
        with pytest.raises(LmopsError, match="dl v2: downloaded checkpoint does not match the sha256"):
            registry.download_checkpoint(ws, cfg, "2")
    finally:
        artifact.write_bytes(good)
    assert not (ws.state / "models" / "dl" / "2").exists()
    assert Checkpoint(registry.download_checkpoint(ws, cfg, "2")).meta["variant"] == "dl-2"


def test_the_champion_loads_as_an_mlflow_pyfunc_model(trained):
    """What any MLflow tool does with a registered model: load models:/NAME@champion and predict."""
    ws, cfg, run_id, ckpt, results = setup(trained, "pyf")
    register(ws, cfg, run_id, ckpt, results)
    registry.promote(ws, cfg)
    tracking.configure(ws, cfg)
    model = mlflow.pyfunc.load_model("models:/pyf@champion")
    params = {"max_tokens": 10, "temperature": 0.8, "seed": 1}
    texts = model.predict(pd.DataFrame({"prompt": ["The list", "Once"]}), params=params)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and any(texts)
    assert model.predict(["The list", "Once"], params=params) == texts  # same seed, same text
    tok = load_tokenizer(ckpt.parent)
    assert texts[0] == continuations(Checkpoint(ckpt).model(), tok, "The list", 10, temperature=0.8, seed=1)[0]


def test_evaluation_is_metrics_of_the_model(trained):
    """log_evaluation links the eval.<metric> metrics to the run's model; registration reads them
    instead of logging them again, and promotion reads them back."""
    ws, cfg, run_id, ckpt, results = setup(trained, "evm")
    other = variant(trained, "evm-1")
    c = client(ws, cfg)
    tracking.configure(ws, cfg)
    tracking.log_model(run_id, other, c)
    evaluated = dict(results, checkpoint=str(other), val_bpb=3.25)
    log_evaluation(run_id, evaluated)
    model_id = c.get_run(run_id).data.tags["lmops.model_id"]
    assert {m.key: m.value for m in c.get_logged_model(model_id).metrics}["eval.val_bpb"] == 3.25
    history = len(c.get_metric_history(run_id, "eval.val_bpb"))
    register(ws, cfg, run_id, other, evaluated)
    assert len(c.get_metric_history(run_id, "eval.val_bpb")) == history  # not logged twice
    mv = c.get_model_version("evm", "1")
    assert registry.model_id_of(mv) == model_id and registry.eval_metrics(mv, c)["val_bpb"] == 3.25
    registry.promote(ws, cfg)
    assert registry.champion_metrics(ws, cfg)["val_bpb"] == 3.25
    assert registry.lineage(ws, cfg, "champion")["eval"]["val_bpb"] == 3.25


def test_a_registration_stopped_midway_is_completed_not_repeated(trained, monkeypatch):
    """A crash after the version was created (here: the alias move fails) leaves a version without
    its completion tag; registering again completes that version instead of making another, and
    the audit log gets each entry once."""
    ws, cfg, run_id, ckpt, results = setup(trained, "half")
    audit = Audit()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill would stop it: nothing after this runs

    monkeypatch.setattr(registry, "_move_alias", crash)
    with pytest.raises(KeyboardInterrupt):
        register(ws, cfg, run_id, ckpt, results, audit=audit)
    c = client(ws, cfg)
    (mv,) = c.search_model_versions("name = 'half'")
    assert "lmops.registration" not in mv.tags and audit.actions() == ["model.registered"]
    monkeypatch.undo()
    assert register(ws, cfg, run_id, ckpt, results, audit=audit) == "1"
    assert len(c.search_model_versions("name = 'half'")) == 1
    assert audit.actions() == ["model.registered", "model.alias_set"]
    mv = c.get_model_version("half", "1")
    assert mv.tags["lmops.registration"] == "complete" and mv.tags["model_card"].endswith("half-v1.md")
    assert str(c.get_model_version_by_alias("half", "challenger").version) == "1"


def test_list_versions(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "lst", "registry.require_approval=true")
    assert registry.list_versions(ws, cfg) == []
    register(ws, cfg, run_id, ckpt, results)
    register(ws, cfg, run_id, variant(trained, "lst-2"), dict(results, val_bpb=9.0),
             champion=dict(results, val_bpb=1.0))
    registry.approve(ws, cfg, "1", "alice")
    registry.promote(ws, cfg, "1")
    listed = registry.list_versions(ws, cfg)
    assert [v["version"] for v in listed] == ["2", "1"]
    new, old = listed
    assert new["aliases"] == ["challenger"] and old["aliases"] == ["champion"]
    assert new["gates"] == "failed" and old["gates"] == "passed"
    assert old["approved_by"] == "alice" and new["approved_by"] is None
    assert new["run_name"] == old["run_name"] == "main" and new["run_id"] == run_id
    assert new["val_bpb"] == 9.0 and old["val_bpb"] == pytest.approx(results["val_bpb"])
    assert old["safety_pass_rate"] == 1.0 and old["complete"] and new["created"] >= old["created"]
