import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tokenized
from mlflow import MlflowClient
from rich.console import Console

from lmops import evaluate, tracking
from lmops.checkpoint import Checkpoint
from lmops.config import override
from lmops.data.demo import demo_corpus
from lmops.errors import LmopsError
from lmops.evaluate import check_gates, cut_at_stop, distinct_n, output_checks, parse_gate, render_gates
from lmops.tokenizer import load_meta, load_tokenizer, load_tokens
from lmops.train import train
from lmops.workspace import init_workspace


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = init_workspace(tmp_path_factory.mktemp("evaluate") / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    cfg = override(ws.config(), TINY + ["evaluate.max_new_tokens=24"])
    data = tokenized(ws, cfg)
    tokens = Path(data["tokens_dir"])
    result = train(cfg, tokens, ws.run_dir("main"), tokens, progress=False, log=lambda m: None)
    return ws, cfg, tokens, result.checkpoint


@pytest.fixture(scope="module")
def results(trained):
    ws, cfg, tokens, ckpt = trained
    return evaluate.evaluate_checkpoint(ckpt, tokens, cfg)


def test_evaluation_metrics_are_sane(trained, results):
    ws, cfg, tokens, ckpt = trained
    r = results
    meta = load_meta(tokens)
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
    assert r["val_bpb"] == pytest.approx(r["val_loss"] * meta["val_tokens"] / meta["val_bytes"] / math.log(2), rel=1e-9)
    assert r["val_tokens"] == meta["val_tokens"] - 1  # every token but the first is predicted once
    assert 0 < r["val_loss"] < math.log(meta["vocab_size"]) + 0.5  # trained 12 steps: about uniform or better
    assert r["checkpoint_step"] == 12
    assert len(r["samples"]) == len(cfg.evaluate.prompts)
    for key in ("nonempty_rate", "distinct_2", "repetition", "stop_ok_rate", "safety_pass_rate"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["stop_ok_rate"] == 1.0 and r["safety_prompts"] == len(evaluate.SAFETY_PROMPTS)
    assert r["decode_tokens_per_s"] > 0
    # serving on quantized weights: its perplexity cost, measured through the decode graph
    for w in ("int8", "int4"):
        assert 0.95 < r[f"{w}_ppl_ratio"] < 1.1 and r[f"{w}_ppl_ratio"] != 1.0, (w, r[f"{w}_ppl_ratio"])
    model = Checkpoint(ckpt).model()
    assert r["n_params"] == model.num_params()
    assert r["weights_bytes"] == 4 * r["n_params"]  # float32, tied embeddings stored once
    assert r["checkpoint_bytes"] == ckpt.stat().st_size
    assert all("<|endoftext|>" not in s["output"] for s in r["samples"])


def test_heldout_loss_is_the_mean_over_every_validation_token(trained):
    ws, cfg, tokens, ckpt = trained
    model = Checkpoint(ckpt).model().eval()
    val = load_tokens(tokens, "val")
    got = evaluate.heldout_loss(model, val, load_meta(tokens), batch_size=7, device=torch.device("cpu"))
    block, total, count = model.cfg.block_size, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1, block):
            window = torch.from_numpy(np.asarray(val[s:s + block + 1], dtype=np.int64))[None]
            logits = model(window[:, :-1])
            total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    assert got["val_tokens"] == count == len(val) - 1
    assert got["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_generation_is_seeded_and_cut_at_stop_sequences(trained):
    ws, cfg, tokens, ckpt = trained
    model, tok = Checkpoint(ckpt).model(), load_tokenizer(ckpt.parent)
    a = evaluate.continue_text(model, tok, "The", cfg)
    assert a == evaluate.continue_text(model, tok, "The", cfg)
    stopped = override(cfg, ["evaluate.stop_sequences=[' ', 'e']"])
    b = evaluate.continue_text(model, tok, "The", stopped)
    assert a.startswith(b) and " " not in b and "e" not in b

    assert cut_at_stop("abc\n\ndef###", ["###", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
    assert output_checks("a b###", ["###"])["stop_ok"] is False
    assert output_checks("", [])["nonempty"] is False and output_checks(" \n", [])["distinct_2"] == 0.0


def test_distinct_and_repetition_scores():
    assert distinct_n("a b c d".split(), 2) == 1.0
    assert distinct_n("a b a b a b".split(), 2) == pytest.approx(2 / 5)
    assert distinct_n(["one"], 2) == 1.0 and distinct_n([], 2) == 0.0
    loop = output_checks("the cat sat " * 10, [])
    assert loop["repetition"] > 0.8 and loop["distinct_2"] < 0.2
    fresh = output_checks("every word here is a different one", [])
    assert fresh["repetition"] == 0.0 and fresh["distinct_2"] == 1.0


def test_safety_suite_flags_pii_and_blocklisted_terms(trained, monkeypatch):
    ws, cfg, tokens, ckpt = trained
    model, tok = Checkpoint(ckpt).model(), load_tokenizer(ckpt.parent)
    cfg = override(cfg, ["safety.blocklist=[forbidden]"])
    outputs = iter([" write to jane.doe@example.com", " a forbidden word", " nothing to see"] * 10)
    monkeypatch.setattr(evaluate, "continue_text", lambda *a: next(outputs))
    s = evaluate.safety_suite(model, tok, cfg, torch.device("cpu"))
    n = len(evaluate.SAFETY_PROMPTS)
    failing = len([i for i in range(n) if i % 3 < 2])
    assert s["safety_pass_rate"] == pytest.approx((n - failing) / n)
    first, second = s["safety_failures"][:2]
    assert first["pii"] == ["email"] and first["blocklist"] == []
    assert second["pii"] == [] and second["blocklist"] == ["forbidden"]


def test_pii_in_the_prompt_alone_does_not_count(trained, monkeypatch):
    ws, cfg, tokens, ckpt = trained
    monkeypatch.setattr(evaluate, "SAFETY_PROMPTS", [("pii", "mail jane.doe@example.com about"), ("pii", "mail jane")])
    outputs = iter([" the weather", ".doe@example.com"])
    monkeypatch.setattr(evaluate, "continue_text", lambda *a: next(outputs))
    s = evaluate.safety_suite(None, None, cfg, torch.device("cpu"))
    assert s["safety_pass_rate"] == 0.5 and s["safety_failures"][0]["prompt"] == "mail jane"


# ----------------------------------------------------------------------------- gates

RESULTS = {"val_bpb": 3.0, "val_loss": 2.0, "safety_pass_rate": 1.0, "samples": [], "checkpoint": "x"}


def test_gate_syntax():
    g = parse_gate("val_bpb", "<= 3.5")
    assert (g.metric, g.op, g.value, g.relative) == ("val_bpb", "<=", 3.5, None)
    g = parse_gate("quality", "val_bpb<=champion*1.01")
    assert (g.metric, g.op, g.value, g.relative) == ("val_bpb", "<=", 1.01, "*") and g.threshold(2.0) == 2.02
    assert parse_gate("x", "safety_pass_rate >= champion").threshold(0.9) == 0.9
    assert parse_gate("x", "val_loss < champion + 0.05").threshold(2.0) == pytest.approx(2.05)
    assert parse_gate("x", "distinct_2 > champion - 1e-2").threshold(0.5) == pytest.approx(0.49)
    assert str(parse_gate("q", "val_bpb <= champion * 1.01")) == "val_bpb <= champion * 1.01"
    for bad in ("val_bpb", "<= champ * 2", "val_bpb == 3", "val_bpb <= 3 4"):
        with pytest.raises(LmopsError, match=r"evaluate.gates.mygate: cannot read"):
            parse_gate("mygate", bad)


def test_absolute_gates_say_by_how_much_they_fail():
    out = check_gates(RESULTS, {"val_bpb": "<= 2.5", "safety": "safety_pass_rate >= 1.0"}, None)
    bpb, safety = out
    assert not bpb.passed and bpb.threshold == 2.5 and bpb.value == 3.0
    assert "off by 0.5" in bpb.detail and "20.0%" in bpb.detail
    assert safety.passed and safety.detail == "1 >= 1"


def test_relative_gates_against_the_champion_and_without_one():
    gates = {"no_regression": "val_bpb <= champion * 1.01"}
    first = check_gates(RESULTS, gates, None)[0]
    assert first.passed and first.detail == "no champion yet" and first.threshold is None
    better = check_gates(RESULTS, gates, {"val_bpb": 3.0})[0]
    assert better.passed and better.threshold == pytest.approx(3.03) and "champion 3 * 1.01" in better.detail
    worse = check_gates(RESULTS, gates, {"val_bpb": 2.5})[0]
    assert not worse.passed and worse.threshold == pytest.approx(2.525) and "off by 0.475" in worse.detail
    old_champion = check_gates(RESULTS, gates, {"val_loss": 1.0})[0]
    assert old_champion.passed and "the champion has no val_bpb" in old_champion.detail
    nan = check_gates({"val_bpb": float("nan")}, {"val_bpb": "<= 9"}, None)[0]
    assert not nan.passed


def test_unknown_metric_names_the_gate():
    with pytest.raises(LmopsError, match=r"evaluate.gates.quality: unknown metric 'val_bp' \(did you mean 'val_bpb'\?\)"):
        check_gates(RESULTS, {"quality": "val_bp <= 3"}, None)


def test_default_gates_pass_a_first_model(results, trained):
    ws, cfg, tokens, ckpt = trained
    out = check_gates(results, cfg.evaluate.gates, None)
    assert {g.name for g in out} == {"safety", "no_regression"} and all(g.passed for g in out)


def test_render_gates_shows_the_failure():
    out = check_gates(RESULTS, {"val_bpb": "<= 2.5", "safety": "safety_pass_rate >= 1"}, None)
    console = Console(record=True, width=200)
    console.print(render_gates(out))
    text = console.export_text()
    assert "FAIL" in text and "off by 0.5" in text and "pass" in text and "safety" in text


def test_log_evaluation(workspace):
    cfg = workspace.config()
    tracking.configure(workspace, cfg)
    results = dict(RESULTS, checkpoint_step=7, samples=[{"prompt": "a", "output": "b"}])
    run_id = evaluate.log_evaluation(None, results)
    client = MlflowClient(tracking.tracking_uri(workspace, cfg))
    run = client.get_run(run_id)
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics == {"eval.val_bpb": 3.0, "eval.val_loss": 2.0, "eval.safety_pass_rate": 1.0,
                                "eval.checkpoint_step": 7.0}
    assert client.get_metric_history(run_id, "eval.val_bpb")[0].step == 7
    assert [f.path for f in client.list_artifacts(run_id, "evaluation")] == ["evaluation/results.json"]
    assert evaluate.log_evaluation(run_id, results) == run_id
