"""An lmops model version as a standard MLflow model: a pyfunc whose `predict` generates text.

This file is the model's code in MLflow's "models from code": `lmops.tracking.log_model` logs it
(`python_model=` this file's path) with the lmops package as code_paths, so `mlflow.pyfunc.load_model`
runs it to build the model; nothing is cloudpickled. The weights are one weights-only lmops
checkpoint (safetensors, no optimizer or RNG state) and the tokenizer files beside it, the artifact
`model` of the MLflow model:

    MLmodel, python_env.yaml, requirements.txt, mlflow_model.py, code/lmops/...,
    artifacts/model/{ckpt.safetensors, tokenizer.json, tokenizer_config.json}

Input: prompts, as the signature says (one string column: a DataFrame of one column, `prompt` if it
has several, a list of strings, or MLflow serving's `{"inputs": [...]}`), or one string. Params (`params=` of predict, in the signature with their
defaults): max_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), seed. Output: the
generated continuation of each prompt (without the prompt), in order. Same seed, same text: each
prompt is sampled with its own generator seeded with `seed`.

    model = mlflow.pyfunc.load_model("models:/lmops-model@champion")
    model.predict(["The list"], params={"max_tokens": 20, "seed": 1})

A LoRA version's artifact holds its adapter instead of a checkpoint (lmops/lora.py); loading it fetches
its base version from the registry MLflow is set to (the one it was loaded from) and merges the adapter
onto the base's weights, checked against the sha256 the fine-tune started from.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "model"  # the artifact holding ckpt.safetensors + tokenizer files
PROMPT = "prompt"  # the input column
PARAMS = {"max_tokens": 64, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 1337}


class LmopsTextGenerator(PythonModel):
    """Loads the checkpoint and tokenizer of the artifact `model`; predict continues each prompt."""

    def load_context(self, context) -> None:
        from lmops.tokenizer import load_tokenizer

        folder = Path(context.artifacts[ARTIFACT])
        self.model = load_weights(folder)
        self.tokenizer = load_tokenizer(folder)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from lmops.sample import continuations

        p = PARAMS | {k: v for k, v in (params or {}).items() if v is not None}
        top_k, top_p = int(p["top_k"]), float(p["top_p"])
        return [continuations(self.model, self.tokenizer, prompt, int(p["max_tokens"]),
                              temperature=float(p["temperature"]), top_k=top_k if top_k > 0 else None,
                              top_p=top_p if top_p < 1.0 else None, seed=int(p["seed"]))[0]
                for prompt in prompts(model_input)]


def is_adapter(folder: Path) -> bool:
    from lmops.checkpoint import CKPT_NAME
    from lmops.lora import is_adapter

    return not (folder / CKPT_NAME).is_file() and is_adapter(folder)


def load_weights(folder: Path):
    """The model of an artifact folder: its checkpoint, or a LoRA adapter merged onto its base version,
    downloaded from the registry (a base that is itself an adapter likewise)."""
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from lmops.checkpoint import CKPT_NAME, Checkpoint
    from lmops.errors import LmopsError
    from lmops.lora import merged_model, read_info
    from lmops.util import first_line, sha256_file

    if not is_adapter(folder):
        return Checkpoint(folder / CKPT_NAME).model("cpu").eval()
    base = read_info(folder)["base"]
    name, _, version = base["version"].rpartition("@")
    with tempfile.TemporaryDirectory(prefix="lmops-base-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        except MlflowException as err:
            raise LmopsError(f"this LoRA adapter's base {base['version']} could not be fetched from the registry "
                             f"{mlflow.get_registry_uri()} ({first_line(err)}); load the version with "
                             "lmops (lmops.registry.download_checkpoint) in its workspace instead") from None
        base_folder = local / "artifacts" / ARTIFACT
        weights = base_folder / CKPT_NAME
        if weights.is_file() and sha256_file(weights) != base["sha256"]:
            raise LmopsError(f"{base['version']} does not hold the weights this LoRA adapter was trained on "
                             f"(sha256 {base['sha256'][:12]})")
        return merged_model(folder, load_weights(base_folder))


def prompts(model_input) -> list[str]:
    """The prompts of a predict input: a DataFrame (its `prompt` column, else its first), a dict of
    columns, a list of strings (or of {"prompt": ...} records), or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = model_input.get(PROMPT, next(iter(model_input.values()), []))
        return [model_input] if isinstance(model_input, str) else [str(x) for x in model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = PROMPT if PROMPT in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column].tolist()]
    return [x[PROMPT] if isinstance(x, dict) else str(x) for x in model_input]


def signature():
    """Prompts in, generated texts out, the sampling params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {int: "long", float: "double"}
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in PARAMS.items()]))


# Run by MLflow when it loads the model from this file (as a module of its own name); importing
# lmops.mlflow_model for signature() does not set a model.
if __name__ != "lmops.mlflow_model":
    mlflow.models.set_model(LmopsTextGenerator())
