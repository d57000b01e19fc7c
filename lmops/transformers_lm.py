"""A Hugging Face causal LM of another family than Llama (GPT-2, OPT, GPT-NeoX, Qwen2, Phi, ...) in lmops.

A Llama folder becomes lmops's own GPT (lmops/hf.py: the same maths, renamed weights). Any other
architecture `transformers` builds with AutoModelForCausalLM is wrapped by `TransformersLM`, which gives
it what training, evaluation, the registry and the engine use of a GPT:

- `cfg`: vocab_size, block_size (the context lmops trains and serves at), n_layer, n_head, n_kv_head,
  head_dim, d_model; `TransformersConfig` holds the model's own config.json beside block_size;
- `forward(idx, targets)` -> logits, or (logits, mean cross-entropy), as GPT.forward;
- `forward_rows(idx, cache)`: the engine's continuous batching (lmops/serve/engine.py). Row b continues
  its sequence from position cache.starts[b]; the model reads and writes the engine's SlotCache through
  a transformers Cache whose layers are that SlotCache (`_SlotLayer`: no copy), at explicit
  position_ids, with an attention mask that hides each row's positions past its own length. Checked
  equal to the plain forward for GPT-2, OPT, GPT-NeoX, Qwen2 and Phi in tests/test_transformers_lm.py;
  a model whose layers keep no key/value cache (state-space, linear attention) does not fit;
- `generate`, `param_groups`, `num_params`, `embed`, as GPT's.

Decoding runs on PyTorch (the engine's ONNX Runtime graph is written for lmops's GPT). Weights are read
from safetensors only, never a pickle (.bin), and no remote code runs (trust_remote_code stays off).
Checkpoints store the weights by the transformers module's names with its config.json in the file's
metadata (lmops/checkpoint.py), so everything that reads a checkpoint reads these too.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmops.errors import LmopsError
from lmops.util import first_line

NEEDS = "a Hugging Face model other than Llama needs transformers >= 5 (pip install 'lmops[hf]')"


def _transformers():
    try:
        import transformers
        from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: F401  (the layered cache API, 5.x)
    except ImportError:
        raise LmopsError(NEEDS) from None
    return transformers


@dataclass(frozen=True)
class TransformersConfig:
    """A transformers model's config.json (`hf`) and the context lmops uses it at (`block_size`)."""

    hf: dict = field(hash=False)
    block_size: int

    def _get(self, *names, default=None):
        for n in names:
            if self.hf.get(n) is not None:
                return self.hf[n]
        return default

    @property
    def model_type(self) -> str:
        return self.hf.get("model_type", "?")

    @property
    def vocab_size(self) -> int:
        return int(self.hf["vocab_size"])

    @property
    def n_layer(self) -> int:
        return int(self._get("num_hidden_layers", "n_layer", "num_layers"))

    @property
    def n_head(self) -> int:
        return int(self._get("num_attention_heads", "n_head"))

    @property
    def n_kv_head(self) -> int:
        return int(self._get("num_key_value_heads", default=self.n_head))

    @property
    def d_model(self) -> int:
        return int(self._get("hidden_size", "n_embd", "d_model"))

    @property
    def head_dim(self) -> int:
        return int(self._get("head_dim", default=self.d_model // self.n_head))

    @property
    def max_positions(self) -> int | None:
        """The longest context the model was built for (its learned position table, or RoPE's trained length)."""
        found = self._get("max_position_embeddings", "n_positions", "n_ctx")
        return None if found is None else int(found)

    def to_dict(self) -> dict:
        return {"hf": self.hf, "block_size": self.block_size}

    @classmethod
    def from_dict(cls, d: dict) -> TransformersConfig:
        return cls(dict(d["hf"]), int(d["block_size"]))


class _SlotLayer:
    """One layer of a transformers Cache backed by the engine's SlotCache (made a CacheLayerMixin in _cache)."""

    is_sliding = False

    def __init__(self, slot, layer: int):
        self.slot, self.layer = slot, layer
        self.keys = self.values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.slot.update(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return max(self.slot.starts)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return max(self.slot.starts) + q, 0

    def get_max_length(self) -> int:
        return int(self.slot.k.shape[3])


_LAYER_CLASS = None


def _cache(slot, n_layer: int):
    """A transformers Cache whose layers read and write slot (lmops.serve.engine.SlotCache) in place."""
    global _LAYER_CLASS
    _transformers()
    from transformers.cache_utils import Cache, CacheLayerMixin

    if _LAYER_CLASS is None:
        _LAYER_CLASS = type("SlotLayer", (_SlotLayer, CacheLayerMixin), {})
    return Cache(layers=[_LAYER_CLASS(slot, i) for i in range(n_layer)])


class TransformersLM(nn.Module):
    """A transformers AutoModelForCausalLM with the interface of lmops's GPT (see the module's docstring)."""

    def __init__(self, cfg: TransformersConfig, hf_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if hf_model is None:
            t = _transformers()
            config = t.AutoConfig.for_model(**cfg.hf)
            hf_model = t.AutoModelForCausalLM.from_config(config)
        if hasattr(hf_model.config, "use_cache"):
            hf_model.config.use_cache = False  # training and forward() keep no cache; forward_rows passes its own
        self.hf = hf_model
        # transformers renames past_key_values to cache (5.x, with a deprecation period): whichever it takes
        self._cache_kw = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def tied_keys(self) -> list[str]:
        """State-dict keys that are another key's tensor (the output head tied to the embedding)."""
        seen, tied = {}, []
        for k, v in self.state_dict(keep_vars=True).items():
            key = (v.data_ptr(), tuple(v.shape))
            (tied.append(k) if key in seen else seen.setdefault(key, k))
        return tied

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        if cache is not None:
            raise ValueError("TransformersLM.forward keeps no cache; decode with forward_rows or generate")
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds block_size {self.cfg.block_size}")
        logits = self.hf(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def forward_rows(self, idx: torch.Tensor, cache, last_only: bool = True) -> torch.Tensor:
        """Serving forward: row b of idx (B, T) continues its own sequence from cache.starts[b] (see GPT.forward_rows)."""
        T = idx.shape[1]
        starts = torch.tensor(cache.starts, device=idx.device)
        end = int(starts.max()) + T
        if end > self.cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size {self.cfg.block_size}")
        positions = starts[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        mask = (torch.arange(end, device=idx.device)[None] < (starts[:, None] + T)).long()  # (B, end)
        out = self.hf(input_ids=idx, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{self._cache_kw: _cache(cache, self.cfg.n_layer)})
        logits = out.logits
        return logits[:, -1] if last_only else logits

    def param_groups(self, weight_decay: float) -> list[dict]:
        from lmops.model import param_groups

        return param_groups(self, weight_decay)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens, as GPT.generate (the window slides at block_size)."""
        from lmops.model import sliding_generate
        from lmops.serve.engine import SlotCache

        w = self.embed.weight
        caches = [SlotCache(self.cfg, 1, w.device, w.dtype) for _ in range(idx.shape[0])]  # a row each
        length = [0]

        def step(pending: torch.Tensor, restart: bool) -> torch.Tensor:
            if restart:
                length[0] = 0
            rows = []
            for b, c in enumerate(caches):
                c.select(0, [length[0]])
                rows.append(self.forward_rows(pending[b:b + 1], c))
            length[0] += pending.shape[1]
            return torch.cat(rows)

        return sliding_generate(self, step, idx, max_new_tokens, temperature, top_k, top_p, generator, stop_token)


# ----------------------------------------------------------------------------- a Hugging Face folder

def import_folder(folder: Path, block_size: int | None = None) -> TransformersLM:
    """A Hugging Face model folder (config.json + safetensors) of any causal-LM architecture transformers
    knows, float32, eval mode. Refused: pickle weights (.bin) only, remote code, a non-causal-LM model."""
    t = _transformers()
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LmopsError(f"{folder / 'config.json'}: cannot read it ({err})") from None
    if hf.get("auto_map"):
        raise LmopsError(f"{folder}: its model needs remote code (auto_map in config.json), which lmops never runs")
    if not any(folder.glob("*.safetensors")):
        hint = " (pickle .bin weights are never loaded: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise LmopsError(f"{folder}: no .safetensors weights{hint}")
    try:
        model = t.AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False,
                                                       dtype=torch.float32)
    except (ValueError, KeyError, OSError) as err:
        raise LmopsError(f"{folder}: transformers cannot load it as a causal LM "
                         f"({first_line(err)})") from None
    cfg = TransformersConfig(model.config.to_dict(), 0)
    block = block_size or cfg.max_positions or 2048
    return TransformersLM(TransformersConfig(cfg.hf, block), model).eval()


def export_folder(model: TransformersLM, out_dir: Path, tokenizer_dir: Path | None = None,
                  overwrite: bool = False) -> Path:
    """The model as a Hugging Face folder of its own architecture (save_pretrained: config.json +
    model.safetensors) with the tokenizer files, written aside and moved in whole."""
    from lmops.hf import TOKENIZER_FILES
    from lmops.util import replace_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise LmopsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
