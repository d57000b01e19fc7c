"""Warm start: the weights and tokenizer a training run starts from (train.init_from).

`train.init_from` names a model: `champion` (the registry's champion), a registered version (`3`,
`lmops-model@3`, `models:/lmops-model/3`), a checkpoint (a run folder or a ckpt.safetensors), or a
Hugging Face folder (config.json + safetensors + tokenizer.json): a Llama, which becomes lmops's own
GPT, or any other causal-LM architecture transformers loads (GPT-2, OPT, Qwen2, ...), wrapped as one
(lmops/transformers_lm.py). Resolved here to one
weights file and the tokenizer beside it; the tokenize stage encodes the data with that tokenizer
(instead of training a new one) and training loads the weights, so the run continues what the base
model knows. The learning-rate schedule starts again with its own warmup: a warm start is a new
run, not a resume (a resume continues the optimizer and data order; this starts both afresh).

A Hugging Face folder is converted once into an lmops checkpoint under .lmops/bases/, keyed by the
sha256 of its files, so later runs and the pipeline's cache keys see one file.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.util import sha256_file, sha256_json
from lmops.workspace import Workspace

# The fields of GPTConfig that fix the weights' shapes or meaning. block_size and dropout may
# change in a warm start: RoPE has no learned positions, and dropout is a training setting.
SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "d_model", "mlp_hidden", "tie_embeddings",
                "rope_theta", "norm_eps")
CONFIG_NAME = {"n_layer": "model.n_layer", "n_head": "model.n_head", "n_kv_head": "model.n_kv_head",
               "d_model": "model.d_model", "mlp_hidden": "model.mlp_hidden", "tie_embeddings": "model.tie_embeddings",
               "rope_theta": "model.rope_theta", "norm_eps": "model.norm_eps"}


@dataclass(frozen=True)
class BaseModel:
    """A model to start from: its lmops checkpoint, tokenizer folder and where it came from."""

    ref: str  # what train.init_from said
    label: str  # for messages: "lmops-model v3 (champion)", a path
    checkpoint: Path  # an lmops checkpoint (weights; optimizer state, if any, is not used)
    tokenizer_dir: Path  # holds tokenizer.json
    version: str | None  # "NAME@3" when a registered version, else None
    sha256: str  # of the checkpoint file: what the pipeline's cache keys on

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> BaseModel:
        return cls(d["ref"], d["label"], Path(d["checkpoint"]), Path(d["tokenizer_dir"]), d.get("version"), d["sha256"])


def resolve(ws: Workspace, cfg: Config, init_from: str | None = None) -> BaseModel | None:
    """The base model of init_from (default cfg.train.init_from); None when training from scratch."""
    ref = cfg.train.init_from if init_from is None else init_from
    if not ref:
        return None
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else ws.root / path
    if path.exists():
        return _from_path(ws, ref, path)
    if "/" in ref and not ref.startswith("models:/"):
        raise LmopsError(f"train.init_from: {ref!r} is neither a file or folder here ({path}) nor a model reference")
    return _from_registry(ws, cfg, ref)


def _from_registry(ws: Workspace, cfg: Config, ref: str) -> BaseModel:
    from lmops import registry

    sel = f"{cfg.registry.model_name}@{ref}" if ref in (registry.CHAMPION, registry.CHALLENGER) else ref
    try:
        mv = registry.resolve(ws, cfg, sel)
    except LmopsError as err:
        raise LmopsError(f"train.init_from: {ref!r}: {err}; or set train.init_from to null to train from scratch") from None
    ckpt = registry.download_checkpoint(ws, cfg, f"{mv.name}@{mv.version}")
    aliases = f" ({', '.join(sorted(mv.aliases))})" if mv.aliases else ""
    return BaseModel(ref, f"{mv.name} v{mv.version}{aliases}", ckpt, ckpt.parent, f"{mv.name}@{mv.version}",
                     sha256_file(ckpt))


def _from_path(ws: Workspace, ref: str, path: Path) -> BaseModel:
    from lmops.checkpoint import CKPT_NAME, Checkpoint
    from lmops.tokenizer import TOKENIZER_FILE

    if path.is_dir() and (path / "config.json").is_file() and not (path / CKPT_NAME).is_file():
        return _from_hf(ws, ref, path)
    ckpt = Checkpoint(path).path  # a run folder or a checkpoint file; refused clearly if neither
    if not (ckpt.parent / TOKENIZER_FILE).is_file():
        raise LmopsError(f"train.init_from: {ckpt.parent} has no {TOKENIZER_FILE} beside the checkpoint; a warm start "
                         "keeps the base model's tokenizer, so it must be there")
    return BaseModel(ref, str(path), ckpt, ckpt.parent, None, sha256_file(ckpt))


def _from_hf(ws: Workspace, ref: str, folder: Path) -> BaseModel:
    """A Hugging Face folder, converted once into .lmops/bases/SHA/ (checkpoint + tokenizer): a Llama
    into lmops's GPT, another architecture as a transformers model (lmops/transformers_lm.py)."""
    from lmops.checkpoint import CKPT_NAME, save_checkpoint
    from lmops.hf import load_folder
    from lmops.tokenizer import TOKENIZER_FILE
    from lmops.util import replace_dir

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    if not (folder / TOKENIZER_FILE).is_file():
        raise LmopsError(f"train.init_from: {folder} has no {TOKENIZER_FILE}; a warm start keeps the base model's "
                         "tokenizer (a fast tokenizer's tokenizer.json is needed)")
    key = sha256_json([(p.name, sha256_file(p)) for p in files])
    dest = ws.state / "bases" / key[:16]
    if not (dest / CKPT_NAME).is_file():
        model = load_folder(folder)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp / CKPT_NAME, model, meta={"imported_from": str(folder), "files_sha256": key})
        for p in files:
            if p.suffix == ".json" and p.name != "config.json":
                shutil.copy2(p, tmp / p.name)
        replace_dir(tmp, dest)
    return BaseModel(ref, f"Hugging Face model {folder}", dest / CKPT_NAME, dest, None, sha256_file(dest / CKPT_NAME))


def tokenizer_of(base: BaseModel):
    """The base model's tokenizer, checked to have the end-of-text token lmops separates documents with."""
    from lmops.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(base.tokenizer_dir)
    if tok.token_to_id(EOT) is None:
        raise LmopsError(f"train.init_from: the tokenizer of {base.label} has no {EOT} token, which lmops puts "
                         "between documents; add it as a special token to its tokenizer.json")
    return tok


def base_config(base: BaseModel, model_cfg, tokens_meta: dict):
    """The run's model config. For lmops's GPT, lmops.yaml's model with the base's vocabulary size (a
    Hugging Face model's embedding may be padded past its tokenizer), refused when a shape field of
    lmops.yaml's model differs from the base's; for another architecture (lmops/transformers_lm.py) the
    base's own config.json at model.block_size (lmops.yaml's model cannot describe it). Refused either
    way when the data was not encoded with the base's tokenizer."""
    from lmops.checkpoint import Checkpoint
    from lmops.model import GPTConfig
    from lmops.tokenizer import tokenizer_sha256
    from lmops.transformers_lm import TransformersConfig

    have = Checkpoint(base.checkpoint).model_config
    if isinstance(have, TransformersConfig):  # its shape is its config.json's; lmops.yaml's model sets the context
        gpt_cfg = TransformersConfig(have.hf, model_cfg.block_size)
        if have.max_positions is not None and model_cfg.block_size > have.max_positions:
            raise LmopsError(f"train.init_from: {base.label} ({have.model_type}) takes at most {have.max_positions} "
                             f"positions; set model.block_size <= {have.max_positions}")
        wrong = []
    else:
        gpt_cfg = GPTConfig.from_settings(model_cfg, have.vocab_size)
        wrong = [f for f in SHAPE_FIELDS if getattr(have, f) != getattr(gpt_cfg, f)]
    if wrong:
        fix = ", ".join(f"{CONFIG_NAME[f]}: {getattr(have, f)!r}" for f in wrong)
        now = ", ".join(f"{CONFIG_NAME[f]} {getattr(gpt_cfg, f)!r}" for f in wrong)
        raise LmopsError(f"train.init_from: {base.label} has another shape than lmops.yaml's model ({now}); "
                         f"set {fix} to start from it, or train from scratch (train.init_from: null)")
    if tokens_meta.get("tokenizer_sha256") != tokenizer_sha256(tokenizer_of(base)):
        raise LmopsError(f"train.init_from: the token shards were encoded with another tokenizer than {base.label}'s; "
                         "encode the dataset with the base model's tokenizer (`lmops train` and the pipeline do)")
    if tokens_meta["vocab_size"] > have.vocab_size:
        raise LmopsError(f"train.init_from: {base.label}'s tokenizer has {tokens_meta['vocab_size']} tokens but its "
                         f"embedding only {have.vocab_size}")
    return gpt_cfg
