"""Warm start (train.init_from): from the champion, a registered version, a run folder and a Hugging Face
Llama folder; the base's tokenizer kept, its weights loaded, a mismatch refused, the base in the lineage."""

import json

import pytest
import torch

from lmops import registry, warmstart
from lmops.checkpoint import CKPT_NAME, Checkpoint
from lmops.config import override
from lmops.data.demo import demo_documents
from lmops.errors import LmopsError
from lmops.hf import export_hf
from lmops.pipeline import prepare_data, run_pipeline
from lmops.tokenizer import load_meta, load_tokenizer, tokenizer_sha256
from lmops.train import train

from conftest import TINY


def quiet(msg: str) -> None:
    pass


def weights(path) -> dict[str, torch.Tensor]:
    return Checkpoint(path).tensors("model.")


def max_change(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def champion_ws(workspace):
    """A workspace whose pipeline made a champion (v1) on 30 demo documents."""
    (workspace.root / "corpus" / "docs.txt").unlink()
    docs = list(demo_documents().values())
    for i, text in enumerate(docs[:30]):
        (workspace.root / "corpus" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    cfg = override(workspace.config(), [*TINY, "train.max_steps=6", "train.eval_interval=6", "evaluate.max_new_tokens=8"])
    out = run_pipeline(workspace, cfg, log=quiet)
    assert out.outputs["promote"]["champion"] == "1"
    return workspace, cfg


def test_warm_start_from_the_champion_keeps_its_tokenizer_and_weights_and_names_it(champion_ws):
    ws, cfg = champion_ws
    champion = registry.download_checkpoint(ws, cfg, "lmops-model@champion")
    # new data with characters the champion's tokenizer never saw: a new tokenizer would differ
    (ws.root / "corpus" / "new.txt").write_text("ЖЖЖ " + list(demo_documents().values())[40], encoding="utf-8")
    warm = override(cfg, ["train.init_from=champion", "train.lr=1e-12", "train.min_lr=0", "train.max_steps=2",
                          "train.eval_interval=2"])
    out = run_pipeline(ws, warm, log=quiet)
    assert out.ran[:4] == ["ingest", "validate", "tokenize", "train"]
    meta = load_meta(out.outputs["tokenize"]["tokens_dir"])
    assert meta["tokenizer_sha256"] == tokenizer_sha256(load_tokenizer(champion.parent)), "the champion's tokenizer"
    trained = out.outputs["train"]["checkpoint"]
    # a learning rate of 1e-12: the run's weights are the champion's, not a fresh random init
    assert max_change(weights(trained), weights(champion)) < 1e-6
    assert Checkpoint(trained).meta["base"]["version"] == "lmops-model@1"

    lin = registry.lineage(ws, cfg, out.outputs["register"]["version"])
    assert lin["base"]["model"] == "lmops-model@1"
    card = registry.resolve(ws, cfg, out.outputs["register"]["version"]).description
    assert "fine-tuned from lmops-model@1 with lmops" in card and "| base model | `lmops-model@1`" in card
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(registry.render_lineage(lin))
    assert "started from lmops-model@1" in console.export_text()

    # the run promoted v2: `champion` names other weights now, while version 1 names the same ones
    again = run_pipeline(ws, override(warm, ["train.init_from=1"]), log=quiet)
    assert "train" in again.cached, "the same base weights, data and config: cached"


def test_a_new_champion_is_a_new_base_for_the_cache(champion_ws):
    ws, cfg = champion_ws
    warm = override(cfg, ["train.init_from=champion", "train.max_steps=3", "train.eval_interval=3"])
    first = run_pipeline(ws, warm, log=quiet)
    assert first.outputs["register"]["version"] == "2"
    registry.promote(ws, cfg, "2", force_reason="test: a new champion")
    second = run_pipeline(ws, warm, log=quiet)
    assert "train" in second.ran, "the champion changed: the warm start's base changed"
    assert Checkpoint(second.outputs["train"]["checkpoint"]).meta["base"]["version"] == "lmops-model@2"


def test_a_base_of_another_shape_or_tokenizer_is_refused(champion_ws):
    ws, cfg = champion_ws
    wider = override(cfg, ["train.init_from=1", "model.d_model=64"])
    with pytest.raises(LmopsError, match=r"another shape than lmops.yaml's model \(model.d_model 64, model.mlp_hidden 192\); set model.d_model: 32"):
        run_pipeline(ws, wider, log=quiet)
    with pytest.raises(LmopsError, match="no such alias"):
        warmstart.resolve(ws, cfg, "lmops-model@nothing")
    with pytest.raises(LmopsError, match="neither a file or folder"):
        warmstart.resolve(ws, cfg, "no/such/folder")

    # shards encoded by another tokenizer than the base's: refused before any step
    scratch = prepare_data(ws, override(cfg, ["tokenizer.kind=bpe", "tokenizer.vocab_size=300"]), log=quiet)
    base = warmstart.resolve(ws, cfg, "champion")
    with pytest.raises(LmopsError, match="encoded with another tokenizer"):
        train(cfg, scratch["tokens_dir"], ws.run_dir("x"), base=base, progress=False, log=quiet)


def test_warm_start_from_a_run_folder_and_from_the_cli(champion_ws, cli):
    ws, cfg = champion_ws
    run_dir = next(ws.runs_dir.glob("pipeline-*"))
    out = cli("train", "--run", "warm", "--init-from", str(run_dir), "--no-progress", *[f"--set={s}" for s in TINY],
              "--set=train.max_steps=2", "--set=train.eval_interval=2")
    assert f"starting from {run_dir}" in out
    assert Checkpoint(ws.run_dir("warm") / CKPT_NAME).meta["base"]["checkpoint"] == str(run_dir / CKPT_NAME)
    info = json.loads((ws.run_dir("warm") / "run.json").read_text())
    assert info["base"]["sha256"] == warmstart.resolve(ws, cfg, str(run_dir)).sha256


def test_warm_start_from_a_hugging_face_llama_folder(workspace, tmp_path):
    cfg = override(workspace.config(), TINY)
    data = prepare_data(workspace, cfg, log=quiet)
    scratch = train(cfg, data["tokens_dir"], workspace.run_dir("scratch"), data["tokenizer_dir"], progress=False, log=quiet)
    hf = export_hf(Checkpoint(scratch.checkpoint).model(), tmp_path / "hf", data["tokenizer_dir"])
    assert (hf / "tokenizer.json").is_file() and (hf / "config.json").is_file()

    base = warmstart.resolve(workspace, cfg, str(hf))
    assert base.version is None and base.checkpoint.parent.parent == workspace.state / "bases"
    assert warmstart.resolve(workspace, cfg, str(hf)) == base, "converted once, then the same file"
    assert max_change(weights(base.checkpoint), weights(scratch.checkpoint)) < 1e-6

    warm_cfg = override(cfg, ["train.max_steps=2", "train.eval_interval=2", f"train.init_from={hf}"])
    data = prepare_data(workspace, warm_cfg, log=quiet)
    result = train(warm_cfg, data["tokens_dir"], workspace.run_dir("warm"), data["tokenizer_dir"], progress=False,
                   log=quiet, base=base)
    cold_cfg = override(cfg, ["train.max_steps=2", "train.eval_interval=2"])
    cold = train(cold_cfg, data["tokens_dir"], workspace.run_dir("cold"), data["tokenizer_dir"], progress=False,
                 log=quiet)
    assert result.metrics["val_loss"] < cold.metrics["val_loss"] - 0.2, \
        "two steps from a trained model must be far ahead of two steps from random weights"

    # a tokenizer without lmops's document separator cannot be trained on the way lmops joins documents
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|endoftext|>"]
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if k != "<|endoftext|>"}
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(LmopsError, match="has no <|endoftext|> token"):
        warmstart.tokenizer_of(warmstart.resolve(workspace, cfg, str(hf)))
