"""A prompt on its way in: its length in tokens checked first, then moderation, then the token ids the
engine gets. Everything here reads the whole prompt, so for a long one it runs in a worker thread
(`off_loop`): on the event loop it would stall every other request and the probes.

- The limits come before moderation: a prompt over serve.max_prompt_tokens (or the model's context) is
  refused without being read by the content rules.
- A text prompt that moderation redacts is encoded again, and its length checked again.
- A prompt of token ids is scored as sent: when moderation would change its text, it is refused (400
  content_blocked, naming the rule), as re-encoding the redacted text would score other tokens than the
  client's. With a flag policy it is served as sent.
- Chat: each message's content is moderated on its own, then the template is rendered, so the template's
  own markers (which look like prompt injection) are never read by the rules.
"""

from __future__ import annotations

import asyncio

from lmops.config import Config
from lmops.safety import STRENGTH, Moderation, moderate
from lmops.serve.metrics import Metrics
from lmops.serve.protocol import APIError
from lmops.serve.source import ServedModel, render_plain

INLINE_CHARS = 4096  # prompts up to this long are tokenized and moderated on the event loop (< 5 ms)


class Prompts:
    """The checks of a server's config on its prompts; metrics None: not counted; moderation False:
    not moderated (benchmarks/serve_load.py measures what it costs)."""

    def __init__(self, cfg: Config, metrics: Metrics | None, moderation: bool = True):
        self.cfg, self.sc, self.metrics, self.moderation_on = cfg, cfg.serve, metrics, moderation

    def moderate_input(self, text: str, row: dict, param: str = "prompt") -> Moderation | None:
        """The verdict on a prompt text, recorded in the row and counted; 400 content_blocked when a rule
        blocks it. None with moderation off."""
        if not self.moderation_on:
            return None
        m = moderate(text, self.cfg.safety, "input")
        if m.hits:
            if self.metrics is not None:
                self.metrics.moderated(m, self.cfg.safety, "input")
            seen = row.setdefault("moderation", {}).setdefault("input", {"action": "allow", "hits": {}})
            seen["action"] = max(seen["action"], m.action, key=STRENGTH.__getitem__)
            for rule, names in m.hits.items():
                seen["hits"][rule] = sorted(set(seen["hits"].get(rule, [])) | set(names))
        if m.action == "block":
            row["prompt"] = m.text
            rules = ", ".join(rule for rule, names in m.hits.items()
                              if self._action(rule) == "block")
            raise APIError(400, f"{param}: refused by the content policy ({rules})", param=param,
                           code="content_blocked")
        return m

    def _action(self, rule: str) -> str:
        sc = self.cfg.safety
        return {"pii": sc.pii_action, "blocklist": sc.blocklist_action, "injection": sc.injection_action}[rule]

    def _ids(self, served: ServedModel, text: str, param: str) -> list[int]:
        """text's token ids, within serve.max_prompt_tokens and the model's context."""
        ids = served.tokenizer.encode(text, add_special_tokens=False).ids
        self._check_length(served, ids, param)
        return ids

    def _check_length(self, served: ServedModel, ids: list[int], param: str) -> None:
        limit = min(self.sc.max_prompt_tokens, served.model.cfg.block_size)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most {limit} (the smaller "
                           "of serve.max_prompt_tokens and the model's context)", param=param,
                           code="context_length_exceeded")

    def encode(self, served: ServedModel, prompt: str | list[int], row: dict, param: str = "prompt"
               ) -> tuple[str, list[int]]:
        """The prompt's text and ids as the model will see them. Limits first (the vocabulary, the prompt
        length), then moderation, which reads the text: a text prompt that moderation redacts is encoded
        again; token ids are scored as sent, so a prompt of ids that moderation would change is refused
        (400, naming the rule) rather than rewritten behind the client's back."""
        tok, vocab = served.tokenizer, served.model.cfg.vocab_size
        if isinstance(prompt, str):
            text, ids = prompt, self._ids(served, prompt, param)
            if (m := self.moderate_input(text, row, param)) is not None and m.text != text:
                text, ids = m.text, self._ids(served, m.text, param)
        else:
            if bad := [i for i in prompt if not 0 <= i < vocab][:1]:
                raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param=param, code="invalid_value")
            ids = list(prompt)
            self._check_length(served, ids, param)
            text = tok.decode(ids, skip_special_tokens=False)
            if (m := self.moderate_input(text, row, param)) is not None and m.text != text:
                row["prompt"] = m.text
                rules = ", ".join(rule for rule in m.hits if self._action(rule) == "redact")
                raise APIError(400, f"{param}: the content policy would redact this prompt ({rules}), and a prompt "
                               "of token ids is scored as sent, never rewritten: send it as text to have it "
                               "redacted, or without what the policy finds", param=param, code="content_blocked")
        if not ids:  # nothing to continue: start a document, as in training
            if served.eos_id is None:
                raise APIError(400, f"{param}: empty", param=param, code="invalid_value")
            ids = [served.eos_id]
        return text, ids

    @staticmethod
    async def off_loop(size: int, fn, *args):
        """fn(*args), in a worker thread when the input is large: tokenizing and moderating a long prompt
        takes milliseconds, which on the event loop would stall every other request and /healthz."""
        if size <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def chat(self, served: ServedModel, messages: list[dict[str, str]], row: dict) -> tuple[str, list[int]]:
        """The chat prompt's text and ids: the length checked on the messages as sent, then each one's
        content moderated, then the template rendered and encoded."""
        roles, template = self.sc.chat_roles, served.chat_template

        def render(ms: list[dict[str, str]]) -> str:
            return template.render(ms) if template else render_plain(ms, roles)

        text = render(messages)
        ids = self._ids(served, text, "messages")
        moderated = []
        for i, m in enumerate(messages):
            verdict = self.moderate_input(m["content"], row, f"messages[{i}].content")
            moderated.append({**m, "content": m["content"] if verdict is None else verdict.text})
        if moderated != messages:  # redacted
            text = render(moderated)
            ids = self._ids(served, text, "messages")
        if not ids:
            if served.eos_id is None:
                raise APIError(400, "messages: the chat template made an empty prompt", param="messages",
                               code="invalid_value")
            ids = [served.eos_id]
        return text, ids
