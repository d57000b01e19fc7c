"""LoRA fine-tuning (train.method: lora, lmops/lora.py): only the adapters train, the checkpoint holds the
merged weights and the adapters, resume is exact; a registered LoRA version holds the adapter alone and is
merged onto its base at download (served, evaluated, loaded by MLflow); Hugging Face export merged, and
the adapter alone with Llama's names, equal to transformers + peft."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

from lmops import lora, registry, tracking, warmstart
from lmops.checkpoint import CKPT_NAME, Checkpoint
from lmops.config import override
from lmops.data.demo import demo_documents
from lmops.errors import LmopsError
from lmops.pipeline import prepare_data, run_pipeline
from lmops.train import train
from lmops.workspace import init_workspace

pytest.importorskip("peft", reason="peft not installed (pip install -e '.[dev]')")

LORA = ["train.method=lora", "train.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [qkv, proj, gate_up, down]}"]


def quiet(msg: str) -> None:
    pass


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4, 6, 5, 3, 1]])


# ----------------------------------------------------------------------------- training

@pytest.fixture
def base_run(workspace):
    """A run trained from scratch (the base), its data, and the config."""
    cfg = override(workspace.config(), TINY)
    data = prepare_data(workspace, cfg, log=quiet)
    base = train(cfg, data["tokens_dir"], workspace.run_dir("base"), data["tokenizer_dir"], progress=False, log=quiet)
    return workspace, cfg, data, base.checkpoint


def lora_train(ws, cfg, data, name, sets, **kw):
    cfg = override(cfg, [f"train.init_from={ws.run_dir('base')}", *sets])
    return train(cfg, data["tokens_dir"], ws.run_dir(name), data["tokenizer_dir"], progress=False,
                 base=warmstart.resolve(ws, cfg), **kw)


def test_lora_needs_a_base_and_lmops_module_names(base_run):
    ws, cfg, data, _ = base_run
    with pytest.raises(LmopsError, match="train.method lora trains adapters on a base model: set train.init_from"):
        override(cfg, ["train.method=lora"])
    with pytest.raises(LmopsError, match="unknown module 'q_proj'; lmops's are qkv, proj, gate_up, down"):
        lora_train(ws, cfg, data, "x", ["train.method=lora", "train.lora={target_modules: [q_proj]}"], log=quiet)
    with pytest.raises(LmopsError, match="name one or more modules"):
        override(cfg, ["train.init_from=champion", "train.method=lora", "train.lora={target_modules: []}"])
    with pytest.raises(LmopsError, match="and none was given"):
        train(override(cfg, ["train.init_from=champion", "train.method=lora"]), data["tokens_dir"], ws.run_dir("x"),
              progress=False, log=quiet)


def test_only_the_adapters_train_and_the_checkpoint_holds_base_plus_update(base_run):
    ws, cfg, data, base_ckpt = base_run
    lines = []
    result = lora_train(ws, cfg, data, "lora", [*LORA, "train.max_steps=6"], log=lines.append)
    assert any("trainable parameters of" in line and "no registered version" in line for line in lines), lines
    ckpt = Checkpoint(result.checkpoint)
    assert ckpt.meta["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["qkv", "proj", "gate_up", "down"]}
    base, merged, adapters = Checkpoint(base_ckpt).tensors("model."), ckpt.tensors("model."), ckpt.tensors("lora.")
    assert merged.keys() == base.keys(), "the usual model tensors: evaluate, sample and serve read them as ever"
    adapted = {k.removesuffix(".lora_A.weight") + ".weight" for k in adapters if k.endswith("lora_A.weight")}
    assert len(adapted) == 4 * 2
    for key, w in base.items():
        if key in adapted:
            m = key.removesuffix(".weight")
            update = adapters[f"{m}.lora_B.weight"] @ adapters[f"{m}.lora_A.weight"] * 2.0  # alpha / r
            assert update.abs().max() > 0, "the adapter trained"
            torch.testing.assert_close(merged[key], w + update, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[key], w), f"{key} is no adapter's: unchanged"
    n_adapter = sum(v.numel() for v in adapters.values())
    assert sum(v.numel() for k, v in ckpt.tensors("optim.").items() if k.endswith("exp_avg")) == n_adapter, \
        "the optimizer holds the adapters only"


def test_a_lora_run_on_an_unregistered_base_is_logged_merged(base_run):
    import mlflow.artifacts

    ws, cfg, data, _ = base_run
    result = lora_train(ws, cfg, data, "lora", [*LORA, "train.max_steps=2"], log=quiet)
    c = tracking.client(ws, cfg)
    run_id = c.create_run(c.get_experiment_by_name(cfg.tracking.experiment).experiment_id).info.run_id
    with tracking.quiet_downloads():
        local = Path(mlflow.artifacts.download_artifacts(tracking.log_model(run_id, result.checkpoint, c),
                                                         dst_path=str(ws.root / "m")))
    folder = local / "artifacts" / "model"
    assert not lora.is_adapter(folder), "no base version to merge an adapter with later: merged weights"
    logged, trained = Checkpoint(folder / CKPT_NAME).tensors("model."), Checkpoint(result.checkpoint).tensors("model.")
    assert all(torch.equal(logged[k], trained[k]) for k in trained)
    assert json.loads(c.get_run(run_id).data.tags[tracking.TAG_LORA])["r"] == 4


def test_resume_of_a_lora_run_is_exact(base_run):
    ws, cfg, data, _ = base_run
    sets = [*LORA[:1], "train.lora={r: 4, dropout: 0.2}", "train.grad_accum=2"]  # dropout: the RNG must resume
    whole = lora_train(ws, cfg, data, "whole", sets, log=quiet)
    first = lora_train(ws, cfg, data, "split", sets, log=quiet, stop_at=5)
    assert first.step == 5
    with pytest.raises(LmopsError, match="train.lora is"):
        lora_train(ws, cfg, data, "split", [*LORA[:1], "train.lora={r: 8}", "train.grad_accum=2"], log=quiet, resume=True)
    with pytest.raises(LmopsError, match="was trained with train.method lora"):
        train(override(cfg, ["train.grad_accum=2"]), data["tokens_dir"], ws.run_dir("split"), progress=False,
              log=quiet, resume=True)
    second = lora_train(ws, cfg, data, "split", sets, log=quiet, resume=True)
    a, b = Checkpoint(whole.checkpoint), Checkpoint(second.checkpoint)
    for prefix in ("model.", "lora.", "optim."):
        ta, tb = a.tensors(prefix), b.tensors(prefix)
        assert ta.keys() == tb.keys() and ta
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"resumed run differs in {prefix}"
    assert second.metrics == whole.metrics


# ----------------------------------------------------------------------------- registry and export

@pytest.fixture(scope="module")
def lora_version(tmp_path_factory):
    """v1: a champion trained from scratch by the pipeline; v2: a LoRA fine-tune of it, by the pipeline."""
    ws = init_workspace(tmp_path_factory.mktemp("lora") / "ws")
    docs = list(demo_documents().values())
    for i, text in enumerate(docs[:30]):
        (ws.root / "corpus" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    cfg = override(ws.config(), [*TINY, "train.max_steps=6", "train.eval_interval=6", "evaluate.max_new_tokens=8"])
    assert run_pipeline(ws, cfg, log=quiet).outputs["promote"]["champion"] == "1"
    out = run_pipeline(ws, override(cfg, ["train.init_from=champion", *LORA]), log=quiet)
    assert out.outputs["register"]["version"] == "2"
    return ws, cfg, Path(out.outputs["train"]["checkpoint"])


def test_a_lora_version_holds_the_adapter_and_is_served_merged(lora_version):
    ws, cfg, run_ckpt = lora_version
    mv = registry.resolve(ws, cfg, "2")
    assert mv.tags[tracking.TAG_BASE] == "lmops-model@1"
    assert mv.tags[tracking.TAG_BASE_SHA] == Checkpoint(run_ckpt).meta["base"]["sha256"]
    assert json.loads(mv.tags[tracking.TAG_LORA])["r"] == 4

    import mlflow.artifacts
    from safetensors import safe_open

    with tracking.quiet_downloads():
        model_dir = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=tracking.client(ws, cfg).get_model_version_download_uri(mv.name, mv.version),
            dst_path=str(ws.root / "v2"), tracking_uri=tracking.tracking_uri(ws, cfg)))
    files = {p.name for p in (model_dir / "artifacts" / "model").iterdir()}
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, lora.INFO_FILE, "tokenizer.json"} <= files
    assert CKPT_NAME not in files
    for f in model_dir.rglob("*.safetensors"):  # no full weights anywhere in the MLflow model
        with safe_open(str(f), framework="pt") as st:
            assert all(".lora_" in k for k in st.keys()), f  # noqa: SIM118 (safe_open has no __iter__)
    adapter = model_dir / "artifacts" / "model" / lora.ADAPTER_WEIGHTS
    assert adapter.stat().st_size < run_ckpt.stat().st_size / 4

    merged = registry.download_checkpoint(ws, cfg, "lmops-model@2")
    ours, theirs = Checkpoint(merged).tensors("model."), Checkpoint(run_ckpt).tensors("model.")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert registry.download_checkpoint(ws, cfg, "2") == merged, "merged once"
    expected = logits(Checkpoint(run_ckpt).model(), IDS)

    from lmops.serve.source import ModelSource

    served = ModelSource(ws, cfg, "lmops-model@2").load()
    assert torch.equal(logits(served.model, IDS), expected)

    from lmops.evaluate import evaluate_checkpoint

    run_eval = json.loads((run_ckpt.parent / "evaluation.json").read_text())["results"]
    assert evaluate_checkpoint(merged, Path(Checkpoint(run_ckpt).meta["tokens_dir"]), cfg)["val_loss"] == \
        run_eval["val_loss"]

    lin = registry.lineage(ws, cfg, "2")
    assert lin["base"]["model"] == "lmops-model@1" and lin["base"]["adapter"] and lin["base"]["lora"]["r"] == 4
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(registry.render_lineage(lin))
    text = console.export_text()
    assert "started from lmops-model@1" in text and "LoRA r=4 on qkv, proj, gate_up, down, the version holds the adapter" in text
    assert "LoRA fine-tune of lmops-model@1: r=4" in mv.description

    import mlflow.pyfunc  # MLflow alone: the adapter's base fetched from the registry and merged

    tracking.configure(ws, cfg)
    loaded = mlflow.pyfunc.load_model("models:/lmops-model/2")
    assert torch.equal(logits(loaded.unwrap_python_model().model, IDS), expected)
    assert isinstance(loaded.predict(["The"], params={"max_tokens": 3})[0], str)


def test_export_merged_and_the_adapter_alone_match_transformers_and_peft(lora_version, cli_on):
    ws, _, run_ckpt = lora_version
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    expected = logits(Checkpoint(run_ckpt).model(), IDS)
    root = ws.root.parent
    cli_on(ws, "export", str(root / "base-hf"), "--model", "1")
    cli_on(ws, "export", str(root / "merged-hf"), "--model", "2")
    out = cli_on(ws, "export", str(root / "adapter"), "--model", "2", "--adapter")
    assert "PeftModel.from_pretrained" in out
    config = json.loads((root / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)

    merged = transformers.LlamaForCausalLM.from_pretrained(root / "merged-hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=0, atol=1e-4)
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base-hf").eval()
    with torch.no_grad():
        assert (base(IDS).logits - expected).abs().max() > 1e-2, "the adapter changes the model: a test of it"
    peft_model = PeftModel.from_pretrained(base, root / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=0, atol=1e-4)

    cli_on(ws, "export", str(root / "nothing"), "--model", "1", "--adapter", code=1)


@pytest.fixture
def cli_on(monkeypatch):
    """The CLI on a workspace given per call: cli_on(ws, *args, code=0) -> its output."""
    from typer.testing import CliRunner

    from lmops.cli import app

    monkeypatch.setenv("COLUMNS", "200")

    def run(ws, *args, code=0):
        result = CliRunner().invoke(app, [*args, "--workspace", str(ws.root)])
        assert result.exit_code == code, result.output
        return result.output
    return run
