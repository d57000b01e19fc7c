"""Where the served model comes from (a registry version or a local path), the loaded model with its
tokenizer and end-of-text token, and how chat messages become its prompt: the model's own chat template
when it has one (a Hugging Face folder whose tokenizer_config.json holds chat_template), else a plain
'Label: content' transcript that a model trained on ordinary text can continue."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from lmops.checkpoint import CKPT_NAME
from lmops.config import Config
from lmops.errors import LmopsError
from lmops.model import GPT
from lmops.serve.protocol import APIError, ChatMessage
from lmops.tokenizer import EOT, load_tokenizer
from lmops.util import first_line, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model with its tokenizer, and the name and version clients and the request log see."""

    model: GPT
    tokenizer: Tokenizer
    name: str
    version: str
    eos_id: int | None  # generation stops there; also the start of an empty prompt
    chat_template: ChatTemplate | None = None  # a Hugging Face model's own; None: the plain transcript
    evaluation: dict[str, float] = field(default_factory=dict)  # a registry version's eval metrics; {} for a path

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: which weights answered."""
        return f"{self.name}-v{self.version}"


_NUMBER = re.compile(r"v?\d+")


class ModelSource:
    """The model a reference names: a registry version (NAME@alias, NAME@3, 3, champion, models:/...) or a
    local path (an lmops checkpoint or the run folder holding one, or a Hugging Face Llama folder).

    `version()` says which version the reference names now; only an alias moves, and `movable` says whether
    it is one. `load(version)` reads that version and the tokenizer saved beside it.
    """

    def __init__(self, ws, cfg: Config, ref: str):
        self.ws, self.cfg, self.ref = ws, cfg, ref
        path = Path(ref).expanduser()
        self.path = path if path.exists() else None
        self.bundle: dict | None = None  # a bundle's bundle.json (lmops/ship/bundle.py), checked
        if self.path is not None:
            self.movable = False
            from lmops.ship.bundle import is_bundle, verify_bundle

            if is_bundle(path):
                self.bundle = verify_bundle(path)  # a changed file fails here, at deploy or serve time
            default = self.bundle["name"] if self.bundle else (path if path.is_dir() else path.parent).name
            self.name = cfg.serve.served_model_name or default
            return
        if ws is None or ref.endswith(".safetensors") or "/" in ref and not ref.startswith("models:/"):
            raise LmopsError(f"{ref}: no such file or folder; give a checkpoint, a run folder, a Hugging Face folder "
                             "or a registry reference such as NAME@champion")
        from lmops import registry

        mv = registry.resolve(ws, cfg, ref)  # a typo fails now, with the reason
        self.registered = mv.name
        self.name = cfg.serve.served_model_name or mv.name
        selector = re.split(r"[@/]", ref)[-1].strip()
        self.movable = not _NUMBER.fullmatch(selector)

    def version(self) -> str:
        """The version the reference names now: a registry query (the file's hash for a path)."""
        if self.bundle is not None:
            return str(self.bundle["version"])
        if self.path is not None:
            return self._file_version()
        from lmops import registry

        return str(registry.resolve(self.ws, self.cfg, self.ref).version)

    def load(self, version: str | None = None) -> ServedModel:
        from lmops.checkpoint import Checkpoint
        from lmops.train import resolve_device

        device = resolve_device(self.cfg.train.device)
        if self.path is None:
            from lmops import registry

            version = version or self.version()
            ckpt = Checkpoint(registry.download_checkpoint(self.ws, self.cfg, f"{self.registered}@{version}"))
            model, folder = ckpt.model(), ckpt.path.parent
            evaluation = self._evaluation(version)
        else:
            p = self.path
            if self.bundle is not None:
                from lmops.ship.bundle import verify_bundle

                verify_bundle(p)  # again: it may have changed since the server started
            if p.is_dir() and (p / "config.json").is_file() and not (p / CKPT_NAME).is_file():
                from lmops.hf import load_folder

                model, folder = load_folder(p), p
            else:
                ckpt = Checkpoint(p)
                model, folder = ckpt.model(), ckpt.path.parent
            version, evaluation = self.version(), {}
        tok = load_tokenizer(folder)
        return ServedModel(model.to(device).eval(), tok, self.name, version, _eos_id(tok, folder),
                           ChatTemplate.from_folder(folder), evaluation)

    def _evaluation(self, version: str) -> dict[str, float]:
        """The version's evaluation metrics (serve.weights auto reads its quantization costs); {} if unreadable."""
        from lmops import registry, tracking

        try:
            client = tracking.client(self.ws, self.cfg)
            return registry.eval_metrics(client.get_model_version(self.registered, version), client)
        except Exception as err:  # serving does not depend on it: auto then keeps fp32
            log.warning("could not read the evaluation of %s v%s: %s", self.registered, version, first_line(err))
            return {}

    def _file_version(self) -> str:
        p = self.path
        if p.is_dir():
            p = p / CKPT_NAME if (p / CKPT_NAME).is_file() else p / "model.safetensors"
        return sha256_file(p)[:12] if p.is_file() else "local"


def _eos_id(tok: Tokenizer, folder: Path) -> int | None:
    """End of text: lmops's <|endoftext|>, else the eos_token_id of a Hugging Face config.json."""
    if (eot := tok.token_to_id(EOT)) is not None:
        return eot
    try:
        eos = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else None


# ----------------------------------------------------------------------------- chat

def chat_messages(messages: list[ChatMessage], roles: dict[str, str]) -> list[dict[str, str]]:
    """{"role", "content"} per message, roles checked against serve.chat_roles and text parts joined."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise APIError(400, f"messages[{i}].role '{m.role}' is not served; use one of {', '.join(roles)} "
                           "(serve.chat_roles)", param=f"messages.{i}.role", code="invalid_value")
        content = m.content
        if isinstance(content, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are served",
                               param=f"messages.{i}.content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def render_plain(messages: list[dict[str, str]], roles: dict[str, str]) -> str:
    """A transcript a model trained on plain text can continue: 'Label: content' lines, then 'Assistant:'."""
    return "".join(f"{roles[m['role']]}: {m['content']}\n" for m in messages) + f"{roles.get('assistant', 'Assistant')}:"


def _token_text(value) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken as a dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face model's chat template (tokenizer_config.json's chat_template, or chat_template.jinja),
    rendered as transformers' apply_chat_template renders it: a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks, messages, add_generation_prompt=True, bos_token and eos_token."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str) or not template.strip():
            return None
        return cls(template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=True,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as err:  # the template's raise_exception: e.g. roles that must alternate
            raise APIError(400, f"messages: the model's chat template refused them ({err})", param="messages",
                           code="invalid_value") from None


@lru_cache(maxsize=8)
def _compiled(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(source)
