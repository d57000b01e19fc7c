"""lmops.yaml: one typed config, the one home of defaults.

Every field says why its default is what it is. Unknown keys are rejected with the key named, so a
typo never silently falls back to a default.

Where a value comes from, last wins: the default, lmops.yaml, an LMOPS__SECTION__KEY environment variable
(how a CI passes its secrets, e.g. LMOPS__STORE__DATABASE_URL), `--set section.key=value`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmops.errors import LmopsError

CONFIG_FILE = "lmops.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    corpus: list[str] = Field(
        default_factory=lambda: ["corpus"],
        description="Files, folders or globs, relative to the workspace: .txt/.md (a document per file), "
        ".jsonl/.csv/.parquet (a document per row), and gzip of these. 'corpus' is the folder `lmops init` "
        "creates.",
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Share held out for validation: 10%, enough for a stable loss estimate on small corpora. "
        "A document goes whole to the side its hash says (adding documents never moves old ones), unless it "
        "is longer than data.split_within_chars.",
    )
    split_within_chars: int = Field(
        32_768, ge=2,
        description="A document longer than this is split inside itself: its last val_fraction (cut at a "
        "line break) is validation, the rest training, as nanoGPT's shakespeare_char splits its one file. "
        "A book in one file would otherwise land whole on one side; past ~8K tokens one document holds "
        "enough text for both. The cut depends on the text alone, so it is as stable as the hash split.",
    )
    text_field: str = Field(
        "text",
        description="Field holding the text in .jsonl and .parquet sources: 'text' is what Hugging Face "
        "datasets, C4 and The Pile use.",
    )
    csv_column: str = Field(
        "text", description="Column holding the text in .csv sources (with a header row); 'text' as for JSONL."
    )
    min_chars: int = Field(
        20, ge=0,
        description="Documents shorter than this (after cleaning) are dropped: below a sentence there "
        "is no context to learn from, only empty records and stray headers.",
    )
    max_chars: int = Field(
        100_000_000, ge=1,
        description="Longer documents are dropped: each is held whole in memory while cleaned and "
        "hashed. 100M characters still lets a whole corpus come as one file (enwik8 fits).",
    )
    min_alpha_fraction: float = Field(
        0.4, ge=0, le=1,
        description="Minimum share of letters among non-space characters. Prose is about 0.9 and code "
        "or tables 0.5-0.8 (Python's own docs: 0.47 at least); below 0.4 it is number dumps, "
        "base64 or markup debris.",
    )
    max_repeated_line_fraction: float = Field(
        0.3, ge=0, le=1,
        description="Maximum share of a document's characters in lines that repeat an earlier line "
        "(Gopher's filter, Rae et al. 2021): boilerplate and spam repeat whole lines; dialogue "
        "repeats only short speaker names (tinyshakespeare: 0.07).",
    )
    scrub_pii: bool = Field(
        True,
        description="Replace e-mails, phone numbers, IPs, card numbers and secrets (safety.pii_kinds) "
        "with placeholders: a model can repeat what it was trained on.",
    )
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1,
        description="Estimated Jaccard similarity of word 5-grams above which a document is a near "
        "duplicate of an earlier one and dropped: 0.8 catches copies with edits or different "
        "boilerplate and spares documents that merely share a topic.",
    )
    min_documents: int = Field(
        1, ge=0,
        description="Gate: ingest fails with fewer documents kept. 1 only catches a corpus cleaned away "
        "to nothing; raise it once you know your corpus's size.",
    )
    max_duplicate_ratio: float = Field(
        0.5, ge=0, le=1,
        description="Gate: ingest fails when more than this share of the documents were duplicates: "
        "past half, a source was most likely listed twice or a scrape looped.",
    )
    use_production_prompts: bool = Field(
        False,
        description="Let `lmops data ingest --from-requests` turn the prompts of the request log into "
        "training data. Off because users' prompts are their data: training on them needs their consent "
        "or a data-use policy that allows it. They are PII-scrubbed by the server's moderation before "
        "they are logged, and again by the data pipeline, but scrubbing is not perfect.",
    )
    mix: float = Field(
        0.1, gt=0, lt=1,
        description="With --from-requests: the share of the training text (and of the validation text), by "
        "characters, that production prompts make up in the new version; the rest is the corpus, so the "
        "model learns the new traffic without forgetting the old. 0.1: measured on the loop's benchmark "
        "(benchmarks/README.md), a fine-tune from the champion on 10% new text halved its bits per byte on "
        "the new traffic and kept the old within the 1% gate, while 0.5 forgot 10% of the old; raise it to "
        "follow the traffic faster where the gates allow.",
    )


class TokenizerConfig(Section):
    kind: Literal["char", "bpe"] = Field(
        "bpe",
        description="bpe (byte-level, no unknown tokens, shorter sequences) for real corpora; "
        "char for tiny corpora and character-level baselines.",
    )
    vocab_size: int = Field(
        4096, ge=260, le=1 << 20,
        description="BPE only. 4096 fits small corpora: bigger vocabularies leave most rows of the "
        "embedding untrained and cost softmax time on CPU.",
    )
    min_frequency: int = Field(
        2, ge=1, description="BPE only. A merge must be seen twice; merges seen once are noise."
    )


class ModelConfig(Section):
    n_layer: int = Field(4, ge=1, description="Depth of a small model that trains in minutes on a CPU.")
    n_head: int = Field(4, ge=1, description="Head width 32 at d_model 128; fewer heads lose quality.")
    n_kv_head: int | None = Field(
        None, ge=1,
        description="Key/value heads (grouped-query attention); None means n_head (plain "
        "multi-head), which is best for models this small.",
    )
    d_model: int = Field(128, ge=8, description="Width: with 4 layers, about 0.8M parameters.")
    mlp_hidden: int | None = Field(
        None, ge=1,
        description="SwiGLU hidden width; None means 8/3 * d_model rounded up to 32, the Llama rule "
        "that keeps parameters equal to a 4x GELU MLP.",
    )
    block_size: int = Field(
        128, ge=2, description="Context length in tokens; the cost of attention grows with its square."
    )
    rope_theta: float = Field(10000.0, gt=0, description="Rotary base; 10000 is ample for short contexts.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon, as in Llama.")
    tie_embeddings: bool = Field(
        True, description="Share input and output embeddings: fewer parameters, better small models."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="0: short runs do not overfit, and dropout costs time; raise it for many epochs.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("d_model / n_head must be even (rotary embeddings rotate pairs)")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        return self


LORA_TARGETS = ("qkv", "proj", "gate_up", "down")  # lmops/model.py's Linear layers (fused as lmops fuses them)


class LoraConfig(Section):
    """LoRA adapters (train.method: lora): a low-rank update B @ A beside each target matrix."""

    r: int = Field(8, ge=1, description="Rank of each adapter: 8, the LoRA paper's usual rank, is enough to adapt "
                   "a model to a domain at a fraction of a percent of its parameters.")
    alpha: float = Field(16.0, gt=0, description="The update is scaled by alpha / r: 2 * r, the common choice, so "
                         "the scale stays the same when r changes and train.lr need not be tuned again.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input: 0.05, as common LoRA "
                           "recipes use, because fine-tuning data is small and overfits easily.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["qkv", "proj"],
        description="The layers to adapt. lmops's, of qkv, proj (attention), gate_up, down (MLP): attention, as "
        "the LoRA paper found sufficient; add gate_up and down for more capacity. A base of another "
        "architecture (a transformers model) names its own (GPT-2: c_attn, c_proj, c_fc); when none of "
        "these names is one of its modules, peft's default for its type is used. Checked against the base "
        "model when training starts.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v or not all(m and m.replace("_", "").isalnum() for m in v):
            raise ValueError(f"name one or more modules (plain names); lmops's are {', '.join(LORA_TARGETS)}")
        return list(dict.fromkeys(v))


class TrainConfig(Section):
    max_steps: int = Field(2000, ge=1, description="Optimizer steps; a few minutes for the default model on CPU.")
    batch_size: int = Field(32, ge=1, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; raise it to grow the batch without memory."
    )
    lr: float = Field(2e-3, gt=0, description="Peak learning rate; small models tolerate a high one.")
    min_lr: float = Field(1e-4, ge=0, description="Floor of the cosine schedule (about lr/10 or lower).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup: stabilises the first Adam steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices only (not norms).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1, the standard.")
    beta2: float = Field(
        0.99, ge=0, lt=1, description="Adam beta2: 0.99 rather than 0.999 because batches are small."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm; 0 turns it off.")
    eval_interval: int = Field(250, ge=1, description="Steps between evaluations on the held-out split.")
    eval_batches: int = Field(
        20, ge=1, description="Batches per evaluation: a loss estimate within about 1% on small corpora."
    )
    checkpoint_interval: int = Field(
        250, ge=1, description="Steps between checkpoints (also written at the end and on Ctrl-C)."
    )
    seed: int = Field(1337, description="Seeds weights, batches and dropout: same seed, same run.")
    device: str = Field("auto", description="auto picks cuda when present, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: bf16 autocast on GPUs that support it and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), where matmuls run about 3x faster; float32 elsewhere.",
    )
    compile: bool = Field(
        False, description="torch.compile the model: faster steps, but a compile pause at the start."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch; None keeps PyTorch's choice (one per core)."
    )
    share_cpu: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Train as a background process (nice 10, OpenMP threads that sleep instead of spinning, "
        "threads from the cores actually available: lmops/resources.py) auto: when an lmops server runs on "
        "this machine, because a training run at full priority beside one collapses both (measured: 0.24-0.31 "
        "of its work per CPU-second, the server's p95 2.2-2.5x; benchmarks/README.md); always; never (alone, "
        "sleeping threads train at 0.6-0.75x). `lmops loop` always retrains in the background. Not part of "
        "the pipeline's cache key: it changes the speed, not the model.",
    )
    init_from: str | None = Field(
        None,
        description="Start from a model's weights instead of random ones: champion, a registered version "
        "(3, lmops-model@3), a run folder or checkpoint, or a Hugging Face folder (a Llama, or another causal-LM "
        "architecture transformers loads: GPT-2, OPT, Qwen2, ...). Its tokenizer is kept (tokenizer.* is then "
        "unused) and model.* must match a Llama's shape (another architecture keeps its own; model.block_size "
        "still sets the context); the learning-rate schedule starts "
        "again with its own warmup (a lower train.lr suits fine-tuning). None: from scratch, because a new "
        "workspace has no model yet.",
    )

    method: Literal["full", "lora"] = Field(
        "full",
        description="full: every weight trains, which a run from scratch needs. lora: only low-rank adapters "
        "on the base model of train.init_from train (train.lora; needs the peft package, lmops[lora]), a "
        "small fraction of the parameters: less memory, less forgetting, and a registered version that "
        "holds only the adapter.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="With method lora: r (8: the LoRA paper's usual rank), alpha (16: scale alpha/r = 2), "
        "dropout (0.05: small fine-tuning data overfits), target_modules (qkv, proj: attention, as the paper; "
        "lmops's are qkv, proj, gate_up, down; a base of another architecture takes its own module names, and "
        "when none of these names is one of its modules, peft's default for its type: GPT-2 c_attn, OPT q_proj "
        "and v_proj).",
    )

    @field_validator("init_from", mode="before")
    @classmethod
    def _version_number(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `init_from: 3` in YAML

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> TrainConfig:
        if self.method == "lora" and not self.init_from:
            raise ValueError("train.method lora trains adapters on a base model: set train.init_from (champion, "
                             "a version, a run folder or checkpoint, a Hugging Face model folder), or use "
                             "train.method full to train from scratch")
        return self


class SafetyConfig(Section):
    """PII, blocklist and prompt-injection rules: one set for data, evaluation and serving."""

    blocklist: list[str] = Field(
        default_factory=list,
        description="Words or phrases (whole words, any case) whose documents are dropped from the "
        "corpus and flagged elsewhere. Empty: what to block depends on your domain and language.",
    )
    pii_kinds: list[Literal["email", "phone", "ip", "credit_card", "secret"]] = Field(
        default_factory=lambda: ["email", "phone", "ip", "credit_card", "secret"],
        description="Kinds of personal data and secrets to find and redact: all of them, because a "
        "model can repeat any of them verbatim.",
    )
    pii_action: Literal["allow", "flag", "redact", "block"] = Field(
        "redact",
        description="Server moderation of PII in prompts and completions: redact replaces it with "
        "placeholders ([EMAIL]) and serves the rest, because most PII in a request is incidental (a "
        "signature, a pasted log) and refusing the whole request would be out of proportion.",
    )
    blocklist_action: Literal["allow", "flag", "block"] = Field(
        "block",
        description="Server moderation of blocklisted terms: block refuses the request or withholds the "
        "completion, because you listed these terms as never to be served (an empty list blocks nothing).",
    )
    injection_action: Literal["allow", "flag", "block"] = Field(
        "flag",
        description="Server moderation of prompt-injection patterns, on prompts only (a completion "
        "cannot inject into its own model): flag records the hit and serves, because the patterns are "
        "heuristics that also match honest text about prompts; set block once your logs show few false hits.",
    )


class StoreConfig(Section):
    """The metadata store (datasets, pipeline runs, audit log)."""

    database_url: str | None = Field(
        None,
        description="None: a SQLite file .lmops/lmops.db in the workspace, nothing to run or set up. "
        "Set a URL such as postgresql+psycopg://user@host:5432/lmops to share datasets, runs and the "
        "audit log across a team; leave the password out and use PGPASSWORD or ~/.pgpass.",
    )


class TrackingConfig(Section):
    """Experiment tracking and the model registry (MLflow)."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking and registry URI. None: sqlite:///.lmops/mlflow.db in the workspace, "
        "artifacts in .lmops/mlartifacts, so runs are tracked with no server; any MLflow URI works "
        "(an http:// MLflow server, databricks, an Azure ML workspace's azureml:// URI).",
    )
    experiment: str = Field(
        "lmops",
        description="MLflow experiment that holds the runs; one per workspace is enough, runs are named "
        "after `lmops train --run`.",
    )


class EvalConfig(Section):
    """Evaluation and its quality gates."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "The", "In this section, we", "It is important to", "For example,", "The following", "A good way to",
        ],
        description="Fixed prompts for the generation checks: short and generic, so they suit any corpus, "
        "and the same for every model, so their scores compare across versions.",
    )
    max_new_tokens: int = Field(
        64, ge=1, description="Tokens generated per prompt: enough to see repetition, a second on CPU."
    )
    temperature: float = Field(
        0.8, ge=0,
        description="Sampling temperature for the checks, seeded (below): the setting people sample "
        "with, where greedy decoding (0) would score every small model as one repeated loop.",
    )
    seed: int = Field(1337, description="Seeds generation: the same model always gives the same outputs.")
    stop_sequences: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>"],
        description="Outputs are cut at the first of these, as a server cuts at a request's `stop`: the "
        "end-of-document token by default; add e.g. a blank line to judge single paragraphs.",
    )
    batch_size: int = Field(
        32, ge=1,
        description="Windows per forward pass over the validation split (no gradients, so the training "
        "batch size always fits).",
    )
    quantized_windows: int = Field(
        16, ge=0,
        description="Validation windows (64 tokens each) scored through the decode graph at int8 and int4 "
        "weights, for int8_ppl_ratio and int4_ppl_ratio (their perplexity over fp32's), which gates can "
        "bound and serve.weights auto reads: 16 windows are about a thousand tokens, enough to see a "
        "quantization that hurts, and little time for a small model. 0: not measured (auto then keeps fp32).",
    )
    gates: dict[str, str] = Field(
        default_factory=lambda: {
            "safety": "safety_pass_rate >= 1.0",
            "no_regression": "val_bpb <= champion * 1.01",
        },
        description="Gates a model must pass to be promoted: name -> '[metric] op number' or "
        "'[metric] op champion * k' / 'champion + k' (metric defaults to the name; op is <, <=, >, >=). "
        "Defaults: every safety prompt passes, and bits per byte at most 1% worse than the champion's "
        "(the first model, with no champion, passes it); an absolute bpb bar depends on the corpus, so "
        "none is set.",
    )


class RegistryConfig(Section):
    """Model registration, promotion and approvals."""

    model_name: str = Field(
        "lmops-model",
        description="Registered model in the MLflow Model Registry; its versions carry the aliases "
        "'challenger' (last registered) and 'champion' (promoted, the one to serve).",
    )
    require_approval: bool = Field(
        False,
        description="Promotion needs a person's approval (`lmops approve`) besides passing gates; off so a "
        "single-user workspace promotes without ceremony, on for teams.",
    )
    approvers: list[str] = Field(
        default_factory=list,
        description="Who may approve; empty means anyone. Names as the audit log records them (the user "
        "name by default).",
    )


class PipelineConfig(Section):
    """The pipeline: ingest -> validate -> tokenize -> train -> evaluate -> register -> promote."""

    steps: list[Literal["ingest", "validate", "tokenize", "train", "evaluate", "register", "promote"]] = Field(
        default_factory=lambda: ["ingest", "validate", "tokenize", "train", "evaluate", "register", "promote"],
        description="Steps to run, in this order; drop 'promote' to leave promotion to a person (`lmops promote`).",
    )


class ServeConfig(Section):
    """The inference engine and the OpenAI-compatible HTTP server."""

    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: loopback, because the server speaks plain HTTP; put it behind a "
        "TLS-terminating proxy, or set 0.0.0.0 in a container whose network you control.",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port: 8000, as vLLM and most OpenAI-compatible servers.")
    served_model_name: str | None = Field(
        None,
        description="The model id clients send and /v1/models lists. None: registry.model_name for a "
        "registry reference, the checkpoint's folder name for a local path.",
    )
    max_batch: int = Field(
        16, ge=1,
        description="Sequences decoded together in one forward pass (continuous batching): on a CPU a "
        "small model's step costs about the same for 1 or 16 rows, so throughput grows almost 16x while "
        "each request slows little; 1 turns batching off.",
    )
    max_waiting: int = Field(
        64, ge=0,
        description="Requests queued for a free batch slot before new ones get 429: four batches' worth, "
        "so a burst is absorbed yet a request never waits behind minutes of work.",
    )
    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="What runs the model's forward while decoding. onnxruntime runs each layer as a few "
        "fused C++ kernels and decodes 2-3x faster than eager PyTorch on a CPU (4-6x transformers' "
        "generate), same tokens (benchmarks/README.md); auto takes it when the model suits it (float32 on the CPU, head_dim a "
        "multiple of 16) and PyTorch otherwise (a GPU, bf16 weights), saying why in the log.",
    )
    weights: Literal["auto", "fp32", "int8", "int4"] = Field(
        "auto",
        description="Precision of the weights the ONNX Runtime decode graph multiplies by. int8 and int4 quantize "
        "every linear (the output head too) in blocks of 32 with a scale and zero point each, and run them with "
        "int8 dot products (MatMulNBits): a decode step reads 4x / 8x fewer weight bytes and ran 1.6-2.8x / "
        "1.7-3.1x faster here (benchmarks/README.md). auto, the default: the fastest on this machine (timed "
        "when the model loads) of fp32 and the precisions whose perplexity cost, measured when the version was "
        "evaluated (int8_ppl_ratio, int4_ppl_ratio), is within auto_max_ppl_ratio; a model with no measured "
        "cost (a local checkpoint) keeps fp32, the weights as trained. Ignored, with a warning, where PyTorch "
        "decodes.",
    )
    auto_max_ppl_ratio: float = Field(
        1.01, ge=1.0,
        description="With weights auto, the largest validation-perplexity ratio over fp32 a quantized precision "
        "may cost: 1.01, the 1% the default no_regression gate lets one version lose to the next.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024,
        description="Largest request body (413 above it): 1 MB holds any prompt within max_prompt_tokens "
        "written as JSON token ids, and stops a client making the server parse huge bodies.",
    )
    max_prompt_tokens: int = Field(
        4096, ge=1,
        description="Longest prompt in tokens (400 above it); the model's context (model.block_size) caps "
        "it further when smaller, since the model never saw longer positions.",
    )
    max_tokens_limit: int = Field(
        1024, ge=1,
        description="Largest max_tokens a request may ask for (400 above it): bounds the time one request "
        "holds a batch slot.",
    )
    default_max_tokens: int = Field(
        128, ge=0,
        description="max_tokens when a request gives none: OpenAI's 16 for completions cuts most answers "
        "mid-sentence, and unbounded ties up a slot; 128 is a paragraph.",
    )
    reload_interval_s: float = Field(
        30.0, gt=0,
        description="When serving an alias (NAME@champion), seconds between checks of where it points; a "
        "promotion is served within this time, at one cheap registry query per check.",
    )
    shadow_queue: int = Field(
        16, ge=1,
        description="Serving an endpoint, answers waiting to be scored or mirrored (lmops/serve/shadow.py); "
        "past this the newest is dropped and counted, so a shadow that falls behind never delays live answers.",
    )
    shadow_busy_share: float = Field(
        0.05, ge=0, le=1,
        description="Serving an endpoint, the share of the time shadow work (mirrored generation, scoring) may "
        "take while live requests run; in idle time it runs freely. On shared cores every shadow forward "
        "slows live answers: scoring every answer at full load added 94% to live latency (2 cores, "
        "benchmarks/endpoint_overhead.py), 5% stays within noise. Under full load fewer answers are scored "
        "(the rest dropped and counted), so a rollout's quality metrics need longer windows; 0 runs shadow "
        "work only while no live request runs.",
    )
    endpoint_poll_s: float = Field(
        2.0, gt=0,
        description="Serving an endpoint, seconds between reads of its revision in the store (one indexed "
        "query): traffic, mirror and deployment changes reach every server within this time.",
    )
    shutdown_timeout_s: float = Field(
        25.0, ge=0,
        description="On SIGTERM/SIGINT, seconds in-flight requests get to finish before they are cut: under "
        "Kubernetes' default 30 s grace period, leaving time to flush the request log.",
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics without an API key. Off: request rates and latencies describe your "
        "traffic, so the deployer role is needed; turn on when only the scraper can reach the port.",
    )
    moderation_holdback_chars: int = Field(
        64, ge=0,
        description="Streaming holds back what moderation could still change as more text comes (the word "
        "or number being written: the start of an e-mail, a card number, a blocklisted phrase), at most "
        "this many characters: PII shorter than this is redacted before any of it is sent. Prose goes out "
        "a word behind the model; a long run without spaces waits up to this many characters.",
    )
    moderation_interval_chars: int = Field(
        16, ge=1,
        description="A moderated stream releases text once this many more characters can go: each "
        "moderation reads the whole completion so far, so moderating at every token costs time growing "
        "with the square of its length (it was the largest per-token cost of a streaming server). 16 "
        "characters are about 4 tokens; the holdback, not this, decides what moderation sees first.",
    )
    chat_roles: dict[str, str] = Field(
        default_factory=lambda: {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"},
        description="Chat messages become lines 'Label: content' and the prompt ends 'Assistant:' (the label "
        "of assistant): a plain transcript, which a model trained on ordinary text can continue without "
        "chat tuning. Roles not listed are refused.",
    )
    chat_stop: list[str] = Field(
        default_factory=lambda: ["\nUser:", "\nSystem:"],
        description="Chat replies end where the model starts writing the next turn itself, as untuned "
        "models do: these are added to every chat request's stop sequences.",
    )


class AuthConfig(Section):
    """API keys, roles and per-key rate limits of the server."""

    enabled: bool = Field(
        True,
        description="Require an API key (Authorization: Bearer) on every endpoint. False serves anyone "
        "with no keys and no rate limits: only for local experiments on a loopback address, never on a "
        "network.",
    )
    rate_limit_per_s: float = Field(
        20.0, gt=0,
        description="Sustained requests per second per API key (a token bucket): well above one person "
        "or a small script, low enough that one leaked or looping key cannot starve the others of a small "
        "model's capacity.",
    )
    burst: int = Field(
        40, ge=1,
        description="Requests a key may make at once (the bucket's size): two seconds' worth at the "
        "sustained rate, so a client that fans out a batch of prompts is not refused.",
    )
    rate_limit_url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB: keep the rate limits' token buckets in Redis, shared by every "
        "server replica, so one key's limit holds across them (several replicas behind a load balancer "
        "would otherwise each grant it the full rate). Unset: each process keeps its own, no server needed. "
        "If Redis cannot be reached, the server falls back to its own buckets and logs it (a limiter outage "
        "must not stop inference). Needs the redis extra (pip install 'lmops[redis]').",
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0,
        description="Seconds a verified key is trusted before the store is asked again: one database "
        "query per key every 5 s rather than per request, and a revoked key still stops working within "
        "5 s. 0 checks the store on every request.",
    )


class MetricCondition(Section):
    """One analysis metric's conditions over `canary` and `stable` (lmops/deploy/expr.py)."""

    success: str = Field(description="The step may pass on this metric when this holds.")
    failure: str = Field(description="The analysis fails when this holds (checked before success).")
    min_samples: int | None = Field(
        None, ge=1,
        description="Values needed on each side before the metric is judged; None: rollout.min_requests.",
    )

    @model_validator(mode="after")
    def _parse(self) -> MetricCondition:
        from lmops.deploy.expr import parse_condition

        parse_condition(self.success)  # an ExpressionError is a ValueError: the key is named
        parse_condition(self.failure)
        return self


def _default_metrics() -> dict[str, MetricCondition]:
    return {
        # Errors: at most one point worse passes; five points worse fails (a broken model is ~100%).
        "error_rate": MetricCondition(success="canary <= stable + 0.01", failure="canary > stable + 0.05"),
        # Latency on a shared 2-core CPU moves by tens of percent between windows: multiplicative margins
        # plus an absolute slack, failing only at 3x + slack (a real regression, not scheduler noise).
        "p95_ttft_s": MetricCondition(success="canary <= stable * 1.5 + 0.05", failure="canary > stable * 3 + 0.25"),
        "p95_latency_s": MetricCondition(success="canary <= stable * 1.5 + 0.1", failure="canary > stable * 3 + 0.5"),
        "moderation_rate": MetricCondition(success="canary <= stable + 0.02", failure="canary > stable * 2 + 0.1"),
        # Quality, in nats per token. A model with random weights predicts prompts at about ln(vocab)
        # (8.3 for 4096 tokens, 4+ for a char model) where a trained one is 1-3 lower: it fails; two
        # trainings of one recipe differ by a few hundredths: they pass.
        "prompt_nll": MetricCondition(success="canary <= stable + 0.1", failure="canary > stable + 0.5"),
        # The answers' NLL under the stable model favours the stable model's own answers, and a short window
        # is noisy: measured on the test models (tests/serve/conftest.py), a judge scored its own sampled
        # answers 1.05, an equally good model's 1.31, a random model's 6.19 (and 0.3-1.0 vs 1.9-2.9 over
        # windows of 2-28 two-token answers on the live server). It tells garbage from a model, not a better
        # model from a worse one, so it has no grey zone: a band between pass and fail paused rollouts of
        # equally good models (canary 1.33 over 448 answers, between 2x + 1 and 2x + 2.5 of the stable's own).
        # Fail past 2x + 2.5, which fails random weights; pass otherwise. Shadow pairs (lmops endpoint
        # compare) compare quality on the same prompts.
        "answer_nll": MetricCondition(success="canary <= stable * 2 + 2.5", failure="canary > stable * 2 + 2.5"),
    }


class SmokeConfig(Section):
    """The smoke suite a blue-green rollout runs against the new deployment before switching."""

    prompts: list[str] = Field(
        default_factory=lambda: ["The", "Hello", "In this section, we"],
        description="Prompts sent to the new deployment (temperature 0, through x-lmops-deployment): a few "
        "short generic ones, enough to show a model that loads, answers and stops, in a second or two.",
    )
    max_tokens: int = Field(16, ge=1, description="Tokens per smoke answer: enough to see generation work.")
    max_latency_s: float = Field(
        10.0, gt=0,
        description="Longest a smoke request may take: generous for a small model on a busy CPU, yet a hung "
        "or pathologically slow deployment fails.",
    )


class RolloutConfig(Section):
    """Rollouts of a new deployment (canary or blue-green), gated by analysis (lmops rollout)."""

    strategy: Literal["canary", "blue-green"] = Field(
        "canary",
        description="canary: traffic in steps, each judged by analysis; the safer default. blue-green: a "
        "smoke test at 0%, then all traffic at once (undo switches back instantly).",
    )
    steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        description="Canary traffic shares, rising, ending at 100: 10% exposes few users to a bad model, "
        "50% gives analysis enough requests on both sides, 100% completes (still analysed, against stable's "
        "earlier windows).",
    )
    window_s: float = Field(
        120.0, gt=0,
        description="Seconds each step is held before analysis: 2 minutes collects min_requests even at a "
        "few requests per second at 10%, and a broken canary is rolled back within one window.",
    )
    min_requests: int = Field(
        20, ge=1,
        description="Values a metric needs on each side before it can pass or fail (fewer: inconclusive): "
        "below ~20 a p95 is the maximum and a rate moves by 5 points per request.",
    )
    inconclusive_limit: int = Field(
        3, ge=1,
        description="Consecutive inconclusive analyses of one step before the rollout pauses for a person: "
        "three windows without a verdict means too little traffic or a grey-zone model.",
    )
    failure_limit: int = Field(
        0, ge=0,
        description="Failed analyses tolerated before aborting, as Argo's failureLimit: 0, any failure rolls "
        "back, since the failure conditions are set well past noise.",
    )
    consecutive_error_limit: int = Field(
        4, ge=0,
        description="Errors in a row while measuring (store unreachable, smoke request failing to connect) "
        "before aborting: Argo's default 4, so a blip does not roll back but a lasting outage does.",
    )
    metrics: dict[str, MetricCondition] = Field(
        default_factory=_default_metrics,
        description="Analysis metrics and their conditions over canary and stable (numbers, + - * /, "
        "comparisons, and/or): relative to stable, so they hold for any model and machine; see "
        "lmops/deploy/analysis.py. Remove a metric to stop judging it.",
    )
    smoke: SmokeConfig = Field(default_factory=SmokeConfig, description="The blue-green smoke suite.")
    tick_interval_s: float = Field(
        1.0, gt=0,
        description="Seconds between the driver's decisions: traffic returns to stable at most this long "
        "after a window ends, at one cheap store query per rollout per second.",
    )
    lease_s: float = Field(
        10.0, gt=0,
        description="How long a driver's claim on a rollout lasts without renewal: a driving server that dies "
        "is replaced by another within 10 s, far longer than a tick, so a slow tick never loses it.",
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        _check_steps(self.steps)
        from lmops.deploy.analysis import METRICS

        if unknown := sorted(set(self.metrics) - set(METRICS)):
            raise ValueError(f"rollout.metrics: unknown metric {', '.join(unknown)} (known: {', '.join(METRICS)})")
        if self.lease_s <= self.tick_interval_s:
            raise ValueError("rollout.lease_s must be longer than rollout.tick_interval_s (a lease is renewed each tick)")
        return self


def _check_steps(steps: list[int]) -> list[int]:
    if not steps or any(not 1 <= s <= 100 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])) \
            or steps[-1] != 100:
        raise ValueError(f"steps {steps}: rising percentages from 1 to 100, ending at 100 (e.g. 10,50,100)")
    return steps


class AlertRule(Section):
    """A rule over a signal that alerts while it holds, e.g. error_rate above 0.02 for 300 s."""

    signal: str = Field(description="A monitor signal (lmops/monitor/signals.py), e.g. error_rate, ttft_p95_s.")
    above: float | None = Field(None, description="Alert when the signal is above this.")
    below: float | None = Field(None, description="Alert when the signal is below this (e.g. feedback_score).")
    for_s: float = Field(
        0.0, ge=0,
        description="Seconds the condition must have held: measured per minute over the last for_s, every minute "
        "with requests must break it (0: the run's window as a whole).",
    )

    @model_validator(mode="after")
    def _check(self) -> AlertRule:
        if (self.above is None) == (self.below is None):
            raise ValueError(f"alert rule on {self.signal}: give exactly one of above or below")
        return self

    def text(self) -> str:
        op, bound = (">", self.above) if self.above is not None else ("<", self.below)
        return f"{self.signal} {op} {bound:g}" + (f" for {self.for_s:g} s" if self.for_s else "")


class MonitorConfig(Section):
    """Monitoring of the request log against a reference (lmops monitor; lmops/monitor)."""

    window_s: float = Field(
        3600.0, gt=0,
        description="Seconds of request log one run reads: an hour holds enough requests for distribution "
        "signals on a modest endpoint and shows a shift the same hour.",
    )
    interval_s: float = Field(
        900.0, ge=0,
        description="Seconds between the runs `lmops serve` makes itself (0: none; `lmops monitor watch` "
        "runs them as a process of its own): four runs an hour over an hour's window, each a few "
        "seconds of CPU, well inside the 2% latency budget.",
    )
    reference: str = Field(
        "training",
        description="What a window is compared with: training (a sample of the validation split of the "
        "dataset the deployed version was trained on, found through lineage), log (the window before), or "
        "a dataset version id.",
    )
    reference_size: int = Field(
        4000, ge=20,
        description="Reference prompts drawn: the window is compared with half, calibration draws disjoint "
        "pairs from all of it; 4000 keeps calibration honest for windows up to 2000 prompts.",
    )
    sample: int = Field(
        256, ge=8,
        description="Prompts per side the model reads for the model signals (prompt_nll, embeddings, "
        "answer_logprob): 256 short prompts are a second of CPU for a small model, and enough for MMD and "
        "a classifier to see a real shift.",
    )
    max_tokens: int = Field(
        128, ge=8,
        description="Tokens of a prompt (and answer) the model reads for the model signals: the start is "
        "what drift shows in, and the cost grows with it.",
    )
    false_alarm_rate: float = Field(
        0.01, gt=0, lt=0.5,
        description="How often a run may alert on traffic like the reference: 1 in 100 runs (split evenly over "
        "the drift signals, each threshold being its share's quantile of the signal between disjoint "
        "reference samples of the window's size).",
    )
    calibration_rounds: int = Field(
        200, ge=10,
        description="Disjoint reference pairs each threshold is calibrated on: 200 in well under a second for "
        "all signals; the tail beyond them is a normal fitted to the draws.",
    )
    permutations: int = Field(
        2000, ge=20,
        description="Permutations of the MMD test: p-values down to 0.0005, below a signal's share of the "
        "false alarm rate; all in one matrix product.",
    )
    min_requests: int = Field(
        30, ge=2,
        description="Prompts a deployment's window needs before drift is judged (fewer: reported, not "
        "judged): below ~30 a distribution is mostly noise.",
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="A fixed threshold per signal instead of the calibrated one (signal: value).",
    )
    signals: list[str] | None = Field(
        None, description="The signals to compute (None: all of lmops/monitor/signals.py)."
    )
    rules: list[AlertRule] = Field(
        default_factory=lambda: [AlertRule(signal="error_rate", above=0.02, for_s=300)],
        description="Alert rules over any signal: by default more than 2% server errors for 5 minutes.",
    )
    repeat_s: float = Field(
        3600.0, ge=0,
        description="An alert on one signal of one deployment is not raised again for this long while it "
        "persists: one page an hour, not one per run.",
    )
    webhook_url: str | None = Field(
        None, description="Alerts are POSTed here as JSON (Slack, Teams, PagerDuty or any receiver)."
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="Seconds a webhook delivery may take.")
    webhook_retries: int = Field(
        3, ge=0,
        description="Retries of a failed delivery, 0.5 s doubling: rides out a receiver's restart; an alert "
        "still undelivered stays in the store and the next run tries again.",
    )

    @model_validator(mode="after")
    def _check(self) -> MonitorConfig:
        from lmops.monitor.signals import SIGNALS

        named = [*self.thresholds, *(self.signals or []), *(r.signal for r in self.rules)]
        if unknown := sorted(set(named) - set(SIGNALS)):
            raise ValueError(f"monitor: unknown signal {', '.join(unknown)} (known: {', '.join(SIGNALS)})")
        return self


DRIFT_SIGNALS = ["prompt_length_psi", "prompt_tokens_js", "prompt_chars_js", "prompt_nll", "embedding_mmd",
                 "embedding_auc"]


class LoopConfig(Section):
    """Closing the loop: what a monitor alert does (lmops loop). On retrain: production prompts -> a mixed
    dataset version -> training from the champion -> evaluation against it on the old validation split and
    on held-out new traffic -> a challenger -> a canary on loop.endpoint -> promoted or rolled back."""

    on_alert: Literal["none", "notify", "retrain"] = Field(
        "notify",
        description="none: the loop ignores alerts. notify: they reach people (monitor.webhook_url) and the loop "
        "records that it left the decision to them (`lmops loop retrain` starts one by hand). retrain: the loop "
        "retrains by itself. notify by default: a retrain moves production, so turn it on once the gates and "
        "the canary are trusted.",
    )
    endpoint: str | None = Field(
        None, description="The endpoint whose alerts trigger a retrain and where the challenger is canaried. "
        "None: the only endpoint of the store (refused when there are several).",
    )
    signals: list[str] = Field(
        default_factory=lambda: list(DRIFT_SIGNALS),
        description="Signals whose alerts trigger a retrain: the prompts' drift, because new data helps only "
        "when the traffic changed; operational alerts (errors, latency) need a person, not a new model.",
    )
    cooldown_s: float = Field(
        6 * 3600.0, ge=0,
        description="Seconds after a retrain starts before another may: 6 hours lets a new champion collect a "
        "monitor window of its own traffic before its drift is judged.",
    )
    max_retrains_per_day: int = Field(
        2, ge=1, description="Retrains started in any 24 hours at most: a cap on cost when alerts keep firing."
    )
    approve_before_canary: bool = Field(
        False, description="A person approves (`lmops loop approve ID`) before the challenger gets live traffic.",
    )
    approve_before_promotion: bool = Field(
        False, description="The canary's last step waits for `lmops approve VERSION` before the champion moves "
        "(as registry.require_approval, for the loop's versions only).",
    )
    window_s: float | None = Field(
        None, gt=0, description="Production prompts read for the new data: the seconds before the alert. None: "
        "the alert's monitor window (monitor.window_s), the traffic that drifted.",
    )
    min_gain: float = Field(
        0.02, ge=0, lt=1,
        description="The challenger's bits per byte on held-out new traffic must be at least this share below "
        "the champion's: 2%, past the noise of a few hundred held-out prompts; a retrain that learned nothing "
        "new is not worth a rollout.",
    )
    max_regression: float = Field(
        0.01, ge=0,
        description="...and on the champion's own validation split at most this share above the champion's: "
        "1%, as evaluate.gates.no_regression, so learning the new traffic does not forget the old.",
    )
    steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        description="The challenger's canary steps (rollout.* sets the windows and analysis): a retrained "
        "model gets the same careful rollout as one a person deployed.",
    )
    interval_s: float = Field(
        60.0, gt=0, description="Seconds between two ticks of `lmops loop watch` (alerts read, runs advanced).",
    )

    @model_validator(mode="after")
    def _known_signals(self):
        from lmops.monitor.signals import SIGNALS

        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"loop.signals: unknown signal {unknown[0]!r} (known: {', '.join(SIGNALS)})")
        _check_steps(self.steps)
        return self


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> LmopsError:
    """The first problem, as '<file>: key a.b: what is wrong'."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        known = _known_keys(Config, e["loc"])
        close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return LmopsError(f"{source}: unknown key '{key}'{hint}")
    msg = e["msg"].removeprefix("Value error, ")
    where = f"key '{key}'" if key else "config"
    return LmopsError(f"{source}: {where}: {msg}")


def parse_config(data: dict[str, Any] | None, source: str = CONFIG_FILE) -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise _one_line(err, source) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """lmops.yaml at path, then the LMOPS__SECTION__KEY environment variables over it (environ: default
    os.environ; {} for none)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmopsError(f"{path}: not found; run `lmops init` to create a workspace") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LmopsError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is not None and not isinstance(data, dict):
        raise LmopsError(f"{path}: expected a mapping of sections (data, tokenizer, model, train)")
    return apply_environment(parse_config(data, str(path)), environ)


# ----------------------------------------------------------------------------- environment variables

ENV_PREFIX = "LMOPS__"
ENV_DELIMITER = "__"
_UNEXPANDED = re.compile(r"\$\([A-Za-z0-9_.]+\)")  # Azure Pipelines leaves $(NAME) of an undefined variable as is


def environment_settings(environ: Mapping[str, str] | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """(variable, key path, value) of each LMOPS__SECTION__KEY variable that has a value, by name.

    pydantic-settings' nested-delimiter style: LMOPS__STORE__DATABASE_URL is store.database_url,
    LMOPS__ROLLOUT__SMOKE__MAX_TOKENS is rollout.smoke.max_tokens. An empty value counts as unset (its
    env_ignore_empty), because a CI maps a secret nobody defined to an empty string."""
    env = os.environ if environ is None else environ
    found = []
    for var in sorted(env):
        if var.upper().startswith(ENV_PREFIX) and env[var] != "":
            path = tuple(p.lower() for p in var[len(ENV_PREFIX):].split(ENV_DELIMITER))
            found.append((var, path, env[var]))
    return found


def apply_environment(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """cfg with the LMOPS__SECTION__KEY environment variables applied, one at a time, each checked like a
    key of lmops.yaml and named when wrong. A value is taken as it is for a text key (a URL, a name) and
    parsed as YAML for any other (numbers, booleans, null, [lists] and {mappings}, JSON included), as
    --set parses it. They override lmops.yaml; --set, applied after, overrides them."""
    for var, path, raw in environment_settings(environ):
        where = f"environment variable {var}"
        if len(path) < 2 or not all(path):
            raise LmopsError(f"{where}: name a key as LMOPS__SECTION__KEY, e.g. LMOPS__TRAIN__MAX_STEPS")
        if _UNEXPANDED.fullmatch(raw.strip()):
            raise LmopsError(f"{where} is {raw!r}: a CI variable that was never defined (Azure Pipelines leaves "
                             f"$(NAME) as it is when there is no NAME); define it, or leave {var} unset")
        field = _field_at(path, where)
        if field is None or _is_text(field.annotation):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                raise LmopsError(f"{where}: {raw!r} is not a value ({getattr(err, 'problem', err)})") from None
        data = cfg.to_dict()
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        cfg = parse_config(data, where)
    return cfg


def _field_at(path: tuple[str, ...], where: str):
    """The field a key path names (None when it names none: parse_config then says which key is unknown)."""
    model: type[BaseModel] = Config
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i == len(path) - 1:
            return field
        inner = field.annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            raise LmopsError(f"{where}: {'.'.join(path[:i + 1])} is not a section; set it whole, e.g. "
                             f"{ENV_PREFIX}{ENV_DELIMITER.join(p.upper() for p in path[:i + 1])}='...'")
        model = inner
    return None


def _is_text(annotation: Any) -> bool:
    """str, or str | None: a value that YAML must not turn into a number, a boolean or null."""
    args = set(typing.get_args(annotation)) - {type(None)}
    return annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and args == {str})


def override(cfg: Config, assignments: list[str]) -> Config:
    """Apply 'section.key=value' overrides (value parsed as YAML) and validate again."""
    data = cfg.to_dict()
    for item in assignments:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise LmopsError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=500")
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise LmopsError(f"--set {item!r}: unknown section '{parts[0]}'")
        data[parts[0]][parts[1]] = yaml.safe_load(value)
    return parse_config(data, "--set")


def render_default_yaml(values: Config | None = None) -> str:
    """lmops.yaml as `lmops init` writes it: every key, its value (the default unless values says
    otherwise) and the reason for its default."""
    lines = ["# lmops workspace config. Every key is optional; shown here with its default and why.", ""]
    defaults = values or Config()
    for section, field in Config.model_fields.items():
        model = field.annotation
        values = getattr(defaults, section)
        if model.__doc__ and model.__doc__ != Section.__doc__:
            lines.append(f"# {model.__doc__.strip().splitlines()[0]}")
        lines.append(f"{section}:" if model.model_fields else f"{section}: {{}}")
        for key, f in model.model_fields.items():
            if f.description:
                lines.append(f"  # {f.description}")
            value = yaml.safe_dump({key: values.model_dump(mode="json")[key]}, default_flow_style=True,
                                   width=1000)
            lines.append("  " + value.strip()[1:-1])
        lines.append("")
    return "\n".join(lines)
