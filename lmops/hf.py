"""Hugging Face interop: our GPT <-> a LlamaForCausalLM folder (config.json + safetensors).

A folder of another architecture (GPT-2, OPT, Qwen2, ...) is no GPT: `load_folder` hands it to
lmops/transformers_lm.py, which wraps the transformers model itself.

The architectures are the same model, so conversion is renaming plus splitting (export) or
concatenating (import) the fused qkv and gate_up matrices. Neither direction imports transformers or
unpickles anything: a folder from the Hub is read with safetensors alone, and an exported folder is
loadable by `LlamaForCausalLM.from_pretrained` and by anything else that reads Llama checkpoints.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmops.errors import LmopsError
from lmops.model import GPT, GPTConfig
from lmops.tokenizer import EOT
from lmops.util import replace_dir

EOS_TOKEN = EOT  # end of text in our tokenizers; also serves as bos, as in GPT-2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- weight names

def _hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF Llama checkpoint for cfg, with its shape (lm_head only when untied)."""
    V, d, f, D = cfg.vocab_size, cfg.d_model, cfg.mlp_hidden, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (cfg.n_head * D, d),
            f"{p}.self_attn.k_proj.weight": (cfg.n_kv_head * D, d),
            f"{p}.self_attn.v_proj.weight": (cfg.n_kv_head * D, d),
            f"{p}.self_attn.o_proj.weight": (d, cfg.n_head * D),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
        }
    return shapes


def _to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state_dict -> HF Llama tensors (lm_head omitted when tied, as HF saves it)."""
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}", f"blocks.{i}"
        q, k, v = sd[f"{b}.attn.qkv.weight"].split([H * D, KV * D, KV * D], dim=0)
        gate, up = sd[f"{b}.mlp.gate_up.weight"].split([cfg.mlp_hidden, cfg.mlp_hidden], dim=0)
        out |= {
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k, f"{p}.self_attn.v_proj.weight": v,
            f"{p}.self_attn.o_proj.weight": sd[f"{b}.attn.proj.weight"],
            f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
            f"{p}.mlp.down_proj.weight": sd[f"{b}.mlp.down.weight"],
            f"{p}.input_layernorm.weight": sd[f"{b}.attn_norm.weight"],
            f"{p}.post_attention_layernorm.weight": sd[f"{b}.mlp_norm.weight"],
        }
    return out


def _from_hf(hf: dict[str, torch.Tensor], cfg: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our state_dict; each expected tensor present with its shape, nothing else."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # buffer in old checkpoints
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store a copy; HF ignores it too
    shapes = _hf_shapes(cfg)
    for name, shape in shapes.items():
        if name not in hf:
            raise LmopsError(f"{source}: missing tensor '{name}'")
        if (got := tuple(hf[name].shape)) != shape:
            raise LmopsError(f"{source}: tensor '{name}' has shape {got}, config.json implies {shape}")
    if extra := sorted(hf.keys() - shapes.keys()):
        raise LmopsError(f"{source}: unexpected tensor '{extra[0]}' (not part of this Llama config)")

    sd = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    sd["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}", f"blocks.{i}"
        sd |= {
            f"{b}.attn.qkv.weight": torch.cat([hf[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"], dim=0),
            f"{b}.attn.proj.weight": hf[f"{p}.self_attn.o_proj.weight"],
            f"{b}.mlp.gate_up.weight": torch.cat([hf[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up")], dim=0),
            f"{b}.mlp.down.weight": hf[f"{p}.mlp.down_proj.weight"],
            f"{b}.attn_norm.weight": hf[f"{p}.input_layernorm.weight"],
            f"{b}.mlp_norm.weight": hf[f"{p}.post_attention_layernorm.weight"],
        }
    return sd


# ----------------------------------------------------------------------------- export

def _config_json(cfg: GPTConfig, eos_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta (5 also accepts it: same value)
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        # explicit nulls without a tokenizer: LlamaConfig would otherwise assume bos 1 / eos 2
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": "float32",  # transformers 4.x
        "dtype": "float32",  # transformers >= 4.56
    }


def _eos_id(tokenizer_json: Path) -> int:
    """Id of <|endoftext|> in a tokenizers-library tokenizer.json."""
    try:
        tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmopsError(f"{tokenizer_json}: cannot read tokenizer ({e})") from None
    for t in tok.get("added_tokens") or []:
        if t.get("content") == EOS_TOKEN:
            return int(t["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and EOS_TOKEN in vocab:
        return int(vocab[EOS_TOKEN])
    raise LmopsError(f"{tokenizer_json}: no {EOS_TOKEN} token (needed as the end-of-text id)")


def _write_tokenizer(tokenizer_dir: Path, dest: Path, cfg: GPTConfig) -> int:
    """Copy the tokenizer files and write generation_config.json; return the eos id."""
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise LmopsError(f"{tokenizer_json}: not found (tokenizer_dir must hold a tokenizer.json)")
    eos = _eos_id(tokenizer_json)
    if eos >= cfg.vocab_size:
        raise LmopsError(f"{tokenizer_json}: {EOS_TOKEN} has id {eos}, outside the model's vocab_size {cfg.vocab_size}")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dest / name)
    if not (dest / "tokenizer_config.json").exists():
        # without it AutoTokenizer would pick LlamaTokenizerFast from config.json and add its own bos
        _write_json(dest / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
            "model_max_length": cfg.block_size,
        })
    _write_json(dest / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos})
    return eos


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_hf(model: GPT, out_dir: Path, tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write model (float32) as a Hugging Face LlamaForCausalLM folder; return out_dir.

    The folder is assembled in a temporary directory beside out_dir and renamed into place, so a crash
    never leaves a half-written export behind. A non-empty out_dir is replaced only with overwrite=True.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LmopsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LmopsError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")
    cfg = model.cfg
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        eos = _write_tokenizer(Path(tokenizer_dir), tmp, cfg) if tokenizer_dir is not None else None
        _write_json(tmp / "config.json", _config_json(cfg, eos))
        # clone: the q/k/v and gate/up slices share storage, which save_file refuses
        tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in _to_hf(model.state_dict(), cfg).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- import

def _read_config(folder: Path) -> GPTConfig:
    """Validate config.json as a plain Llama and translate it to GPTConfig."""
    path = folder / "config.json"
    if not path.is_file():
        raise LmopsError(f"{path}: not found (not a Hugging Face model folder)")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmopsError(f"{path}: cannot read JSON ({e})") from None
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    if c.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise LmopsError(f"{path}: model_type {c.get('model_type')!r} / architectures {archs} is unsupported "
                         "(only llama / LlamaForCausalLM)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise LmopsError(f"{path}: {key}=true is unsupported (lmops models have no biases)")
    if c.get("rope_scaling") is not None:
        raise LmopsError(f"{path}: rope_scaling is unsupported (only plain RoPE; found {c['rope_scaling']})")
    rope = c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LmopsError(f"{path}: rope_parameters.rope_type {rope_type!r} is unsupported (only 'default')")
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LmopsError(f"{path}: partial_rotary_factor is unsupported (only full rotary)")
    if c.get("hidden_act", "silu") != "silu":
        raise LmopsError(f"{path}: hidden_act {c['hidden_act']!r} is unsupported (only silu)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(c.get(key), int):
            raise LmopsError(f"{path}: {key} missing or not an integer")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or d // heads
    if d % heads or head_dim != d // heads:
        raise LmopsError(f"{path}: head_dim {head_dim} != hidden_size/num_attention_heads is unsupported")
    if heads % kv_heads:
        raise LmopsError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return GPTConfig(
        vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads, n_kv_head=kv_heads, d_model=d,
        mlp_hidden=c["intermediate_size"], block_size=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        dropout=0.0,
    )


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of model.safetensors or of the shards its index names; plus a name for messages."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files, source = [single], single.name
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LmopsError(f"{index}: cannot read weight_map ({e!r})") from None
        names = sorted(set(weight_map.values()))
        if any(Path(n).name != n for n in names):
            raise LmopsError(f"{index}: shard names must be plain file names in the folder")
        files, source = [folder / n for n in names], index.name
    else:
        hint = " (pickle .bin checkpoints are not loaded: convert to safetensors)" if any(folder.glob("*.bin")) else ""
        raise LmopsError(f"{single}: not found, nor {index.name}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors |= load_file(f)
        except (OSError, SafetensorError) as e:
            raise LmopsError(f"{f}: cannot read safetensors ({e})") from None
    return tensors, source


def import_hf(folder: Path) -> GPT:
    """Load a Hugging Face LlamaForCausalLM folder (safetensors) as our GPT, float32, eval mode."""
    folder = Path(folder)
    cfg = _read_config(folder)
    tensors, source = _read_tensors(folder)
    sd = _from_hf(tensors, cfg, source)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)  # cannot fail after _from_hf's checks; copies into float32
    return model.eval()


def load_folder(folder: Path):
    """A Hugging Face model folder as a model lmops trains and serves: a Llama as our GPT (import_hf),
    any other causal-LM architecture as a TransformersLM (lmops/transformers_lm.py, needs transformers)."""
    folder = Path(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise LmopsError(f"{folder / 'config.json'}: cannot read it ({e})") from None
    if model_type in (None, "llama"):
        return import_hf(folder)
    from lmops.transformers_lm import import_folder

    return import_folder(folder)
