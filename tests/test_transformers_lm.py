"""Base models of another architecture than Llama (lmops/transformers_lm.py): the engine's batched forward
equals the plain forward for GPT-2, OPT, GPT-NeoX, Qwen2 and Phi; a GPT-2 folder built here is fine-tuned
in full and with LoRA by the pipeline, registered (the LoRA version as its adapter, naming its base
version), served over HTTP, evaluated, loaded by MLflow, and exported merged and as the adapter alone,
each equal to transformers (+ peft) on the same weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY

from lmops import lora, registry, tracking
from lmops.checkpoint import CKPT_NAME, Checkpoint
from lmops.config import override
from lmops.data.demo import demo_documents
from lmops.pipeline import prepare_data, run_pipeline
from lmops.serve.engine import Engine, SamplingParams, SlotCache
from lmops.tokenizer import load_tokenizer
from lmops.transformers_lm import TransformersConfig, TransformersLM
from lmops.workspace import init_workspace

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[dev]')")
pytest.importorskip("peft", reason="peft not installed (pip install -e '.[dev]')")

V = 61
SMALL = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "opt": lambda: transformers.OPTConfig(**SMALL, max_position_embeddings=64, ffn_dim=64, word_embed_proj_dim=32),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, max_position_embeddings=64, intermediate_size=64),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=64,
                                              intermediate_size=64),
    "phi": lambda: transformers.PhiConfig(**SMALL, max_position_embeddings=64, intermediate_size=64),
}


def wrapped(arch: str, seed: int = 0) -> TransformersLM:
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]())
    return TransformersLM(TransformersConfig(hf.config.to_dict(), 64), hf).eval()


def quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_rows_at_their_own_lengths_in_one_forward_equal_the_plain_forward(arch):
    model = wrapped(arch)
    assert model.cfg.n_kv_head == (2 if arch == "qwen2" else 4)
    seqs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 4)]
    expected = [model(s[None])[0] for s in seqs]
    cache = SlotCache(model.cfg, 4, torch.device("cpu"), torch.float32)
    for row, s in enumerate(seqs):  # each prompt but its last two tokens, prefilled in two chunks
        n = len(s) - 2
        for a, b in ((0, n // 2), (n // 2, n)):
            cache.select(row, [a])
            got = model.forward_rows(s[None, a:b], cache, last_only=False)[0]
            torch.testing.assert_close(got, expected[row][a:b], rtol=0, atol=1e-5)
    for t in range(2):  # then all rows decode together, each at its own position
        starts = [len(s) - 2 + t for s in seqs]
        cache.select(0, starts)
        got = model.forward_rows(torch.stack([s[p] for s, p in zip(seqs, starts)])[:, None], cache)
        for row, p in enumerate(starts):
            torch.testing.assert_close(got[row], expected[row][p], rtol=0, atol=1e-5)


def test_the_engine_decodes_a_transformers_model_on_pytorch_as_generate_does():
    model = wrapped("gpt2")
    engine = Engine(model, max_batch=4).start()
    try:
        assert engine.runtime == "torch", "the ONNX Runtime graph is lmops's GPT's"
        prompts = [[1, 2, 3], [5, 8, 13, 21, 34], [9]]
        handles = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0)) for p in prompts]
        got = [[e.token_id for e in h] for h in handles]
    finally:
        engine.stop()
    for p, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([p]), 10, temperature=0)[0, len(p):].tolist()
        assert tokens == want


# ----------------------------------------------------------------------------- a GPT-2 base, end to end

LORA = ["train.method=lora", "train.lora={r: 4, alpha: 8, dropout: 0.0}"]  # lmops's default targets: none is GPT-2's


@pytest.fixture(scope="module")
def gpt2_versions(tmp_path_factory):
    """A GPT-2 folder (random weights, the workspace's char tokenizer); v1: fully fine-tuned from it by
    the pipeline, champion; v2: a LoRA fine-tune of v1."""
    root = tmp_path_factory.mktemp("gpt2")
    ws = init_workspace(root / "ws")
    for i, text in enumerate(list(demo_documents().values())[:30]):
        (ws.root / "corpus" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    cfg = override(ws.config(), [*TINY, "train.max_steps=6", "train.eval_interval=6", "evaluate.max_new_tokens=8"])
    tokenizer_dir = Path(prepare_data(ws, cfg, log=quiet)["tokenizer_dir"])
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=load_tokenizer(tokenizer_dir).get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=None, eos_token_id=None))
    folder = root / "gpt2"
    hf.save_pretrained(folder)
    shutil.copy2(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    full = run_pipeline(ws, override(cfg, [f"train.init_from={folder}"]), log=quiet)
    assert full.outputs["promote"]["champion"] == "1"
    tuned = run_pipeline(ws, override(cfg, ["train.init_from=champion", *LORA]), log=quiet)
    assert tuned.outputs["register"]["version"] == "2"
    return ws, cfg, folder, Path(full.outputs["train"]["checkpoint"]), Path(tuned.outputs["train"]["checkpoint"])


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4, 6, 5, 3, 1]])


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model.eval()(ids)
    return out.logits if hasattr(out, "logits") else out


def test_full_fine_tune_of_a_gpt2_folder_keeps_gpt2(gpt2_versions):
    ws, cfg, folder, full_ckpt, _ = gpt2_versions
    ckpt = Checkpoint(full_ckpt)
    assert isinstance(ckpt.model_config, TransformersConfig) and ckpt.model_config.model_type == "gpt2"
    assert ckpt.model_config.block_size == 32, "the context lmops.yaml's model.block_size sets"
    trained, base = ckpt.model(), Checkpoint(next((ws.state / "bases").glob("*/" + CKPT_NAME))).model()
    assert isinstance(trained, TransformersLM)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "training changed the weights"
    original = transformers.GPT2LMHeadModel.from_pretrained(folder)
    torch.testing.assert_close(logits(base), logits(original), rtol=0, atol=1e-6)
    from lmops.serve.source import ModelSource

    served = ModelSource(ws, cfg, str(folder)).load()  # `lmops serve --model FOLDER`
    torch.testing.assert_close(logits(served.model), logits(original), rtol=0, atol=1e-6)

    from lmops import warmstart
    from lmops.errors import LmopsError
    from lmops.tokenizer import load_meta

    longer = override(cfg, [f"train.init_from={folder}", "model.block_size=128"])
    with pytest.raises(LmopsError, match="takes at most 64 positions; set model.block_size <= 64"):
        warmstart.base_config(warmstart.resolve(ws, longer), longer.model, load_meta(ckpt.meta["tokens_dir"]))


def test_a_lora_fine_tune_of_gpt2_is_its_adapter_and_is_served_merged(gpt2_versions):
    import openai

    ws, cfg, _, _, run_ckpt = gpt2_versions
    meta = Checkpoint(run_ckpt).meta["lora"]
    assert meta["target_modules"] == ["c_attn"] and meta["fan_in_fan_out"], "peft's GPT-2 default, Conv1D"
    mv = registry.resolve(ws, cfg, "2")
    assert mv.tags[tracking.TAG_BASE] == "lmops-model@1"
    merged = registry.download_checkpoint(ws, cfg, "lmops-model@2")
    folder = merged.parent
    assert lora.is_adapter(folder) and not any(".lora_" not in k for k in lora.read_adapters(folder))
    ours, theirs = Checkpoint(merged).tensors("model."), Checkpoint(run_ckpt).tensors("model.")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    expected = logits(Checkpoint(run_ckpt).model())
    base = logits(Checkpoint(registry.download_checkpoint(ws, cfg, "1")).model())
    assert (base - expected).abs().max() > 1e-4, "the adapter changes the model: a test of it"

    from lmops.evaluate import evaluate_checkpoint

    run_eval = json.loads((run_ckpt.parent / "evaluation.json").read_text())["results"]
    assert evaluate_checkpoint(merged, Path(Checkpoint(run_ckpt).meta["tokens_dir"]), cfg)["val_loss"] == \
        run_eval["val_loss"]
    assert registry.lineage(ws, cfg, "2")["base"]["model"] == "lmops-model@1"

    from serve.conftest import LiveServer

    from lmops.serve.app import create_app
    from lmops.serve.source import ModelSource
    from lmops.store import Store

    source = ModelSource(ws, cfg, "lmops-model@2")
    torch.testing.assert_close(logits(source.load().model), expected, rtol=0, atol=0)
    with Store.for_workspace(ws, cfg) as store:
        _, secret = store.keys.create("gpt2", "inference", "tests")
        live = LiveServer(create_app(cfg, source, store))
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=secret, max_retries=0)
            answer = client.completions.create(model="lmops-model", prompt="The ", max_tokens=5, temperature=0)
            assert answer.usage.completion_tokens == 5 and answer.system_fingerprint == "lmops-model-v2"
            assert live.server.engine.runtime == "torch"
        finally:
            live.stop()

    import mlflow.pyfunc  # MLflow alone: the adapter's base fetched from the registry and merged

    tracking.configure(ws, cfg)
    loaded = mlflow.pyfunc.load_model("models:/lmops-model/2")
    torch.testing.assert_close(logits(loaded.unwrap_python_model().model), expected, rtol=0, atol=0)
    assert isinstance(loaded.predict(["The"], params={"max_tokens": 3})[0], str)


def test_export_of_gpt2_merged_and_its_adapter_match_transformers_and_peft(gpt2_versions):
    from peft import PeftModel
    from typer.testing import CliRunner

    from lmops.cli import app

    ws, _, _, _, run_ckpt = gpt2_versions
    root = ws.root.parent

    def export(out, *args):
        result = CliRunner().invoke(app, ["export", str(root / out), "--workspace", str(ws.root), *args])
        assert result.exit_code == 0, result.output

    result = CliRunner().invoke(app, ["import", str(gpt2_versions[2]), "--workspace", str(ws.root), "--run", "gpt2"])
    assert result.exit_code == 0, result.output
    assert isinstance(Checkpoint(ws.run_dir("gpt2")).model(), TransformersLM)
    export("base-hf", "--model", "1")
    export("merged-hf", "--model", "2")
    export("adapter", "--model", "2", "--adapter")
    expected = logits(Checkpoint(run_ckpt).model())
    assert json.loads((root / "merged-hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert (root / "merged-hf" / "tokenizer.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "merged-hf")
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    config = json.loads((root / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] and config["r"] == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base-hf")
    peft_model = PeftModel.from_pretrained(base, root / "adapter")
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-5)


def test_a_folder_of_an_unknown_or_pickled_model_is_refused_clearly(tmp_path, workspace):
    from lmops.errors import LmopsError
    from lmops.transformers_lm import import_folder

    wrapped("opt").hf.save_pretrained(tmp_path / "opt")
    assert isinstance(import_folder(tmp_path / "opt"), TransformersLM)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "opt" / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LmopsError, match="pickle .bin weights are never loaded"):
        import_folder(tmp_path / "bin")
    remote = json.loads((tmp_path / "opt" / "config.json").read_text()) | {"auto_map": {"AutoModel": "x.Y"}}
    (tmp_path / "opt" / "config.json").write_text(json.dumps(remote))
    with pytest.raises(LmopsError, match="needs remote code"):
        import_folder(tmp_path / "opt")
    from lmops import warmstart
    from lmops.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["some text"], "char"), tmp_path / "opt")
    cfg = override(workspace.config(), [*TINY, f"train.init_from={tmp_path / 'opt'}"])
    with pytest.raises(LmopsError, match="needs remote code"):  # nor as a base to train from
        warmstart.resolve(workspace, cfg)
