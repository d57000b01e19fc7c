"""LoRA fine-tuning (train.method: lora): low-rank adapters with peft, on lmops's own GPT or on a base
of another architecture (a transformers model, lmops/transformers_lm.py).

Training puts peft's LoRA layers on the layers train.lora.target_modules names (lmops's fused qkv,
proj, gate_up, down; another architecture's own names, or peft's default for its type: `fit`) of a
model holding the base model's weights (train.init_from); only the adapters train. A run's checkpoint holds the merged weights W + alpha/r * B @ A as its usual model
tensors, so evaluating, sampling and serving a run folder need nothing new; beside them the adapters
under "lora." (with the optimizer state of the adapters and the RNG: an exact resume, the base
weights being read again from the base) and meta["lora"], the settings.

Registered, a LoRA run on a registered base is the adapter alone, in PEFT's format (adapter_config.json
+ adapter_model.safetensors, lmops's module names) with the tokenizer and lmops_lora.json naming the
base version and its weights' sha256; the registry merges it onto the base's weights when it downloads
the version (merged_model), once. Exported for Hugging Face (export_hf_adapter), another architecture's
adapters keep their names; lmops's fused adapters are split into Llama's projections: a LoRA on qkv is exactly LoRAs on q_proj, k_proj and v_proj sharing
lora_A, each with its rows of lora_B (gate_up likewise into gate_proj and up_proj), same r and alpha.

peft is imported to train and to write adapter_config.json only: merging is plain torch, so serving a
LoRA version needs no peft.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmops.checkpoint import config_from, config_metadata, model_of
from lmops.errors import LmopsError
from lmops.model import GPTConfig

PREFIX = "lora."  # the adapters' tensors in a run's checkpoint
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "base_model.model."  # PEFT's prefix of adapter tensor names in a saved adapter
INFO_FILE = "lmops_lora.json"  # beside a registered adapter: its base, settings, model config and meta


def settings(train_cfg) -> dict:
    """The LoRA settings of a TrainConfig as a checkpoint's meta["lora"] records them."""
    lc = train_cfg.lora
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "target_modules": list(lc.target_modules)}


def fit(lora: dict, model) -> dict:
    """The settings for this model. lmops's GPT: as they are. Another transformers architecture
    (lmops/transformers_lm.py): target_modules as given where they name its modules, else (lmops's
    default qkv, proj name none of GPT-2's or OPT's) peft's default for its model type (GPT-2: c_attn;
    OPT, Qwen2: q_proj, v_proj); and fan_in_fan_out for layers that store their weight transposed
    (GPT-2's Conv1D), which merging must know."""
    from lmops.config import LORA_TARGETS
    from lmops.transformers_lm import TransformersLM

    if not isinstance(model, TransformersLM):
        if unknown := [m for m in lora["target_modules"] if m not in LORA_TARGETS]:
            raise LmopsError(f"train.lora.target_modules: unknown module {', '.join(map(repr, unknown))}; lmops's are "
                             f"{', '.join(LORA_TARGETS)} (a base of another architecture takes its own names)")
        return lora
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in lora["target_modules"] if t in names]
    if not targets:
        from peft.utils import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults,
        )

        targets = list(defaults.get(model.cfg.model_type, []))
        if not targets:
            raise LmopsError(f"train.lora.target_modules {lora['target_modules']} name no module of this "
                             f"{model.cfg.model_type} model and peft has no default for it; set train.lora."
                             f"target_modules to its projections (e.g. {sorted(names)[:6]})")
    conv = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    return lora | {"target_modules": targets, "fan_in_fan_out": bool(conv & set(targets))}


def scaling(lora: dict) -> float:
    return lora["alpha"] / lora["r"]


def _peft():
    try:
        import peft
    except ImportError:
        raise LmopsError("train.method lora needs the peft package: pip install 'lmops[lora]' (or pip install "
                         "peft)") from None
    return peft


def peft_config(lora: dict, target_modules: list[str] | None = None, **extra):
    """peft.LoraConfig of the settings (target_modules: other names than lmops's, for an export)."""
    return _peft().LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              target_modules=list(target_modules or lora["target_modules"]), bias="none",
                              fan_in_fan_out=lora.get("fan_in_fan_out", False), **extra)


def apply(model, lora: dict):
    """Freeze model and put peft's LoRA layers on its target modules (in place): only they train.
    lora: fit(settings, model)."""
    model.requires_grad_(False)
    _peft().inject_adapter_in_model(peft_config(lora), model)
    return model


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapters of a model apply() adapted, by peft's saved names (blocks.0.attn.qkv.lora_A.weight)."""
    return {name.replace(".default.", "."): p.detach() for name, p in model.named_parameters() if ".lora_" in name}


@torch.no_grad()
def load_adapters(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (adapter_tensors' names) into a model apply() adapted; all of them, exactly."""
    params = {name.replace(".default.", "."): p for name, p in model.named_parameters() if ".lora_" in name}
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise LmopsError(f"the checkpoint's adapters do not fit train.lora (missing {missing[:2]}, extra {extra[:2]}); "
                         "resume with the train.lora the run started with")
    for name, p in params.items():
        p.copy_(tensors[name])


@torch.no_grad()
def merge(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], lora: dict) -> dict[str, torch.Tensor]:
    """A plain state dict with each adapted weight W replaced by W + alpha/r * B @ A (as peft merges;
    transposed for a layer that stores W transposed, lora["fan_in_fan_out"])."""
    out, s, transposed = dict(state), scaling(lora), lora.get("fan_in_fan_out", False)
    for key, a in adapters.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            w = out[f"{module}.weight"]
            delta = adapters[f"{module}.lora_B.weight"].to(w) @ a.to(w)
            out[f"{module}.weight"] = w + (delta.T if transposed else delta) * s
    return out


def merged_state(model, lora: dict) -> dict[str, torch.Tensor]:
    """The merged weights of a model apply() adapted, as the plain model's state dict (nothing changed in model)."""
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    return merge(base, adapter_tensors(model), lora)


# ----------------------------------------------------------------------------- a registered adapter

def write_adapter(folder: Path, ckpt, source_sha256: str) -> Path:
    """A LoRA run's checkpoint (lmops.checkpoint.Checkpoint) as a registered model's artifact folder:
    PEFT's adapter files (lmops's module names) and INFO_FILE (base version and sha256, settings, the
    run's model config and meta, from which the merged checkpoint is rebuilt). Returns the adapter file."""
    lora, base = ckpt.meta["lora"], ckpt.meta["base"]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_KEY + k: v.contiguous() for k, v in ckpt.tensors(PREFIX).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config(lora, base_model_name_or_path=base["version"]).save_pretrained(str(folder))
    key, _ = config_metadata(ckpt.model_config)
    info = {"base": {"version": base["version"], "sha256": base["sha256"]}, "lora": lora,
            key: ckpt.model_config.to_dict(), "meta": ckpt.meta | {"source_sha256": source_sha256}}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return folder / ADAPTER_WEIGHTS


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / INFO_FILE).is_file() and (Path(folder) / ADAPTER_WEIGHTS).is_file()


def read_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8"))


def read_adapters(folder: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PEFT_KEY): v for k, v in load_file(str(Path(folder) / ADAPTER_WEIGHTS)).items()}


def merged_model(folder: Path, base):
    """The model of a registered adapter folder: its adapters merged onto base's weights, with the run's
    model config (a warm start may change block_size and dropout)."""
    info = read_info(folder)
    model = model_of(config_from({k: json.dumps(v) for k, v in info.items() if k in ("gpt_config", "hf_config")}))
    model.load_state_dict(merge(base.state_dict(), read_adapters(folder), info["lora"]), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- Hugging Face export

def _adapters_of(ckpt) -> dict[str, torch.Tensor]:
    """A LoRA model's adapters: in its checkpoint (a run) or in the adapter file beside it (a downloaded
    version)."""
    found = ckpt.tensors(PREFIX)
    if not found and (ckpt.path.parent / ADAPTER_WEIGHTS).is_file():
        found = read_adapters(ckpt.path.parent)
    return found


def to_hf(adapters: dict[str, torch.Tensor], cfg: GPTConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """lmops's adapters -> PEFT's tensors for LlamaForCausalLM and its target module names."""
    H, KV, D, f = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden
    split = {"attn.qkv": [("self_attn.q_proj", H * D), ("self_attn.k_proj", KV * D), ("self_attn.v_proj", KV * D)],
             "attn.proj": [("self_attn.o_proj", None)],
             "mlp.gate_up": [("mlp.gate_proj", f), ("mlp.up_proj", f)],
             "mlp.down": [("mlp.down_proj", None)]}
    out, targets = {}, set()
    for i in range(cfg.n_layer):
        for ours, theirs in split.items():
            key = f"blocks.{i}.{ours}"
            if f"{key}.lora_A.weight" not in adapters:
                continue
            a, b = adapters[f"{key}.lora_A.weight"], adapters[f"{key}.lora_B.weight"]
            rows = b.split([n for _, n in theirs]) if len(theirs) > 1 else [b]
            for (name, _), part in zip(theirs, rows):
                p = f"{PEFT_KEY}model.layers.{i}.{name}"
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = a.clone(), part.clone()
                targets.add(name.rsplit(".", 1)[1])
    return out, sorted(targets)


def export_hf_adapter(ckpt_path: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write a LoRA model's adapter alone as a PEFT adapter of the Hugging Face Llama export of its base
    (`lmops export --adapter`): adapter_config.json + adapter_model.safetensors, Llama's module names."""
    from lmops.checkpoint import Checkpoint
    from lmops.util import replace_dir

    ckpt = Checkpoint(ckpt_path)
    adapters, lora = _adapters_of(ckpt), ckpt.meta.get("lora")
    if not lora or not adapters:
        raise LmopsError(f"{ckpt.path}: not a LoRA fine-tune (train.method: lora), so it has no adapter; export "
                         "it without --adapter")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise LmopsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    if isinstance(ckpt.model_config, GPTConfig):
        tensors, targets = to_hf(adapters, ckpt.model_config)
    else:  # a transformers model: its own module names already, under lmops's wrapper (lmops/transformers_lm.py)
        tensors = {PEFT_KEY + k.removeprefix("hf."): v for k, v in adapters.items()}
        targets = lora["target_modules"]
    base = ckpt.meta.get("base") or {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        peft_config(lora, targets, task_type="CAUSAL_LM",
                    base_model_name_or_path=base.get("version") or base.get("label")).save_pretrained(str(tmp))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
