"""Hugging Face interop: our GPT and transformers' LlamaForCausalLM must compute the same function."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmops.errors import LmopsError
from lmops.hf import export_hf, import_hf
from lmops.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

TOL = 1e-4
CASES = {  # GQA with tied embeddings, and plain multi-head attention with a separate lm_head
    "gqa-tied": dict(n_head=4, n_kv_head=2, tie_embeddings=True),
    "mha-untied": dict(n_head=4, n_kv_head=4, tie_embeddings=False),
}


def tiny_gpt(n_head: int, n_kv_head: int, tie_embeddings: bool, seed: int = 0) -> GPT:
    """Random weights at unit scale (not the 0.02 init), so a wrong theta, eps or layout shows in the logits."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=64, mlp_hidden=96,
                    block_size=32, rope_theta=5000.0, norm_eps=1e-4, tie_embeddings=tie_embeddings)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 if name == "embed.weight" else p.shape[1] ** -0.5)
    return model.eval()


def hf_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, hf


def random_ids(length: int = 17, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_export_matches_transformers(tmp_path: Path, case: str):
    model = tiny_gpt(**CASES[case])
    out = export_hf(model, tmp_path / "hf")
    ids = random_ids()
    theirs, hf = hf_logits(out, ids)
    assert hf.config.rope_parameters["rope_theta"] == 5000.0 and hf.config.rms_norm_eps == 1e-4
    with torch.no_grad():
        ours = model(ids)
    assert ours.abs().max() > 1.0  # the comparison below is meaningful
    assert (ours - theirs).abs().max().item() <= TOL
    # tied checkpoints store the embedding once, as Hugging Face does
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) == (not CASES[case]["tie_embeddings"])


@pytest.mark.parametrize("case", CASES)
def test_import_from_transformers(tmp_path: Path, case: str):
    c = CASES[case]
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_kv_head"], max_position_embeddings=32, rms_norm_eps=1e-4,
        rope_theta=5000.0, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},  # 4.x / 5.x spelling
        tie_word_embeddings=c["tie_embeddings"], initializer_range=0.5,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = import_hf(tmp_path / "hf")
    assert (model.cfg.rope_theta, model.cfg.norm_eps) == (5000.0, 1e-4)
    assert model.cfg.tie_embeddings == c["tie_embeddings"]
    ids = random_ids()
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(tmp_path: Path, case: str):
    model = tiny_gpt(**CASES[case])
    back = import_hf(export_hf(model, tmp_path / "hf"))
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if model.cfg.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight


def test_sharded_checkpoint(tmp_path: Path):
    model = tiny_gpt(**CASES["mha-untied"])
    folder = export_hf(model, tmp_path / "hf")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back = import_hf(folder)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_kv_cache_generation_matches_transformers(tmp_path: Path):
    model = tiny_gpt(**CASES["gqa-tied"])
    out = export_hf(model, tmp_path / "hf")
    _, hf = hf_logits(out, random_ids())
    prompt = random_ids(length=5)
    ours = model.generate(prompt, 10, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
                         min_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert ours.shape == theirs.shape == (2, 15)
    assert torch.equal(ours, theirs)


def test_tokenizer_files_and_special_ids(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    out = export_hf(tiny_gpt(**CASES["gqa-tied"]), tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == 0 and hf_tok("the cat")["input_ids"] == [2, 3]


def test_export_needs_no_transformers(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now raises ImportError
    out = export_hf(tiny_gpt(**CASES["gqa-tied"]), tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    import_hf(out)


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path: Path):
    model = tiny_gpt(**CASES["gqa-tied"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(LmopsError, match="not empty"):
        export_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").exists()
    export_hf(model, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("breakage, match", [
    ("no-config", "config.json"),
    ("architecture", "MistralForCausalLM"),
    ("rope-scaling", "rope_scaling"),
    ("rope-type", "rope_type"),
    ("bias", "attention_bias"),
    ("missing-tensor", "model.layers.1.self_attn.k_proj.weight"),
    ("extra-tensor", "model.layers.2.mlp.up_proj.weight"),
    ("shape", "model.layers.0.mlp.down_proj.weight"),
    ("no-weights", "model.safetensors"),
])
def test_bad_folders_raise_lmops_error(tmp_path: Path, breakage: str, match: str):
    folder = export_hf(tiny_gpt(**CASES["mha-untied"]), tmp_path / "hf")
    tensors = load_file(folder / "model.safetensors")
    if breakage == "no-config":
        (folder / "config.json").unlink()
    elif breakage == "architecture":
        _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    elif breakage == "rope-scaling":
        _edit_config(folder, rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif breakage == "rope-type":
        _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0})
    elif breakage == "bias":
        _edit_config(folder, attention_bias=True)
    elif breakage == "no-weights":
        (folder / "model.safetensors").unlink()
    else:
        if breakage == "missing-tensor":
            del tensors["model.layers.1.self_attn.k_proj.weight"]
        elif breakage == "extra-tensor":
            tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 64)
        elif breakage == "shape":
            tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
        save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LmopsError, match=match) as err:
        import_hf(folder)
    assert "\n" not in str(err.value)
