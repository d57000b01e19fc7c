"""Checkpoints: one safetensors file holding everything needed to continue a run exactly.

Model weights, optimizer state and RNG states are tensors; step, configs and optimizer
hyper-parameters are JSON in the file's metadata. No pickle anywhere, so loading a checkpoint from
elsewhere cannot run code. Writes are atomic: a temporary file in the same folder is written,
fsynced and renamed over the old one, so a crash or a full disk leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmops.errors import LmopsError
from lmops.model import GPT, GPTConfig
from lmops.util import remove_stale_temps, temp_name

FORMAT = "lmops-checkpoint-1"
CKPT_NAME = "ckpt.safetensors"  # a run folder's checkpoint; a registered model's weights-only one too


def _tied(model) -> list[str]:
    """State-dict keys that alias another's tensor (a tied output head): saved once, tied again on load."""
    if isinstance(model, GPT):
        return ["lm_head.weight"] if model.cfg.tie_embeddings else []
    return model.tied_keys()


def _model_tensors(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict() if state is None else state)
    for key in _tied(model):
        state.pop(key)  # the same tensor as the embedding's; safetensors refuses aliases
    return {f"model.{k}": v.detach().contiguous() for k, v in state.items()}


def config_metadata(cfg) -> tuple[str, str]:
    """The metadata key and JSON of a model config: gpt_config (lmops's GPT) or hf_config (lmops/transformers_lm.py)."""
    return ("gpt_config" if isinstance(cfg, GPTConfig) else "hf_config"), json.dumps(cfg.to_dict())


def config_from(metadata: dict):
    """The model config config_metadata wrote (GPTConfig or TransformersConfig)."""
    if "hf_config" in metadata:
        from lmops.transformers_lm import TransformersConfig

        return TransformersConfig.from_dict(json.loads(metadata["hf_config"]))
    return GPTConfig(**json.loads(metadata["gpt_config"]))


def model_of(cfg):
    """A new model of a config: lmops's GPT, or a transformers model wrapped as one (lmops/transformers_lm.py)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    from lmops.transformers_lm import TransformersLM

    return TransformersLM(cfg)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"optim.{idx}.{key}": val.contiguous() for idx, st in sd["state"].items() for key, val in st.items()}
    return tensors, sd["param_groups"]


def save_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer | None = None,
                    rng: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write model (+ optimizer, RNG states, JSON-able meta) to path.

    model_state: the model's weights when they are not model.state_dict() (a LoRA run's merged
    weights, lmops/lora.py); extra: more tensors by their full names (a LoRA run's "lora." adapters)."""
    tensors = _model_tensors(model, model_state)
    key, cfg_json = config_metadata(model.cfg)
    metadata = {"format": FORMAT, key: cfg_json}
    if optimizer is not None:
        opt_tensors, groups = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        metadata["optim_groups"] = json.dumps(groups)
    for name, state in (rng or {}).items():
        tensors[f"rng.{name}"] = state
    tensors.update({k: v.detach().contiguous() for k, v in (extra or {}).items()})
    metadata["meta"] = json.dumps(meta or {})
    tensors = {k: v.cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, f".{path.name}.tmp-")  # a writer killed mid-write left its half file
    tmp = path.with_name(temp_name(f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        kept = f"the last good checkpoint is intact at {path}" if path.exists() else "no earlier checkpoint"
        reason = getattr(err, "strerror", None) or str(err)
        raise LmopsError(f"{path}: could not write checkpoint ({reason}); {kept}; free space and resume") from err
    return path


class Checkpoint:
    """A checkpoint file read back: configs and meta at once, tensors on demand by prefix (serving or
    evaluating a model never reads the optimizer state, about twice the size of the weights)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / CKPT_NAME
        if not self.path.is_file():
            raise LmopsError(f"{self.path}: no checkpoint here; train one with `lmops train`")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise LmopsError(f"{self.path}: not a readable checkpoint ({err})") from None
        if metadata.get("format") != FORMAT:
            raise LmopsError(f"{self.path}: not an lmops checkpoint (format {metadata.get('format')!r})")
        self.model_config = config_from(metadata)  # GPTConfig, or TransformersConfig for another architecture
        self.meta: dict[str, Any] = json.loads(metadata.get("meta", "{}"))
        self._groups = json.loads(metadata["optim_groups"]) if "optim_groups" in metadata else None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with prefix ('model.', 'optim.', 'rng.', 'lora.'), prefix removed."""
        with safe_open(str(self.path), framework="pt") as f:
            return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def model(self, device: str | torch.device = "cpu"):
        """The model: a GPT, or a TransformersLM (lmops/transformers_lm.py) for another architecture."""
        model = model_of(self.model_config)
        self.load_model_into(model)
        return model.to(device)

    def load_model_into(self, model) -> None:
        state = self.tensors("model.")
        if isinstance(model, GPT):
            if model.cfg.tie_embeddings:
                state["lm_head.weight"] = state["embed.weight"]
            model.load_state_dict(state, strict=True)
            return
        tied = set(model.tied_keys())
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - tied or unexpected:
            raise LmopsError(f"{self.path}: its weights do not fit the model of its config (missing "
                             f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")

    def load_optimizer_into(self, optimizer: torch.optim.Optimizer) -> None:
        if self._groups is None:
            raise LmopsError(f"{self.path}: holds no optimizer state (an exported model?); cannot resume from it")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, val in self.tensors("optim.").items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = val
        optimizer.load_state_dict({"state": state, "param_groups": self._groups})

    def rng(self, name: str) -> torch.Tensor | None:
        return self.tensors("rng.").get(name)
