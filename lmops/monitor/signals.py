"""The monitor's signals: what each measures, of what, and how it is judged.

Drift signals compare a window of the request log with a reference (lmops/monitor/drift.py computes
them, lmops/monitor/run.py calibrates their thresholds on the reference); the others are values of the
window judged only by alert rules (monitor.rules).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    name: str
    kind: str  # prompts | embeddings | answers | operations | feedback
    drift: bool  # compared with a reference and given a calibrated threshold
    model: bool  # needs the served model's forward pass (run on a sample)
    help: str


_ALL = [
    Signal("prompt_length_psi", "prompts", True, False, "PSI of prompt length in tokens (10 reference-quantile bins)"),
    Signal("prompt_length_wasserstein", "prompts", True, False,
           "Wasserstein distance of prompt lengths, over the reference's standard deviation"),
    Signal("prompt_tokens_js", "prompts", True, False, "Jensen-Shannon distance of the token-frequency distributions"),
    Signal("prompt_chars_js", "prompts", True, False,
           "Jensen-Shannon distance of character classes (letters, digits, space, punctuation, other)"),
    Signal("prompt_unmerged", "prompts", True, False,
           "share of prompt bytes the tokenizer left as single-character tokens, window minus reference"),
    Signal("prompt_nll", "prompts", True, True,
           "the served model's loss per prompt token (its perplexity on traffic), median of the window minus the reference's"),
    Signal("embedding_mmd", "embeddings", True, True,
           "MMD (RBF kernel) of mean-pooled hidden states, with a permutation test"),
    Signal("embedding_auc", "embeddings", True, True,
           "cross-validated AUC of a classifier telling window from reference embeddings (0.5: alike)"),
    Signal("answer_length", "answers", True, False, "Wasserstein distance of answer lengths, over the reference's sd"),
    Signal("answer_stop_js", "answers", True, False, "Jensen-Shannon distance of stop reasons"),
    Signal("answer_repetition", "answers", True, False,
           "mean share of repeated word 3-grams per answer, window minus reference"),
    Signal("answer_moderation_rate", "answers", True, False, "share of requests moderation acted on, window minus reference"),
    Signal("answer_logprob", "answers", True, True,
           "the model's confidence: mean log-probability of its own answer tokens, median of the reference minus the window's"),
    Signal("request_rate", "operations", False, False, "requests per second"),
    Signal("error_rate", "operations", False, False, "share of requests answered with a status >= 500"),
    Signal("client_error_rate", "operations", False, False, "share of requests answered with a status 400-499"),
    Signal("ttft_p50_s", "operations", False, False, "median time to first token"),
    Signal("ttft_p95_s", "operations", False, False, "95th percentile of the time to first token"),
    Signal("ttft_p99_s", "operations", False, False, "99th percentile of the time to first token"),
    Signal("latency_p50_s", "operations", False, False, "median end-to-end latency"),
    Signal("latency_p95_s", "operations", False, False, "95th percentile of the end-to-end latency"),
    Signal("latency_p99_s", "operations", False, False, "99th percentile of the end-to-end latency"),
    Signal("token_latency_p50_s", "operations", False, False, "median time per output token after the first"),
    Signal("token_latency_p95_s", "operations", False, False, "95th percentile of the time per output token"),
    Signal("feedback_rate", "feedback", False, False, "feedback received per request"),
    Signal("feedback_score", "feedback", False, False, "mean feedback score (0..1)"),
]

SIGNALS: dict[str, Signal] = {s.name: s for s in _ALL}
KINDS = ("prompts", "embeddings", "answers", "operations", "feedback")
