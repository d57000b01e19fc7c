"""Where the served model comes from (a registry version or a local path), the loaded model with its
tokenizer and end-of-text token, and the chat template that turns messages into a prompt."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.model import GPT
from lmops.serve.protocol import APIError, ChatMessage
from lmops.tokenizer import EOT, load_tokenizer
from lmops.util import sha256_file


@dataclass(frozen=True)
class ServedModel:
    """A loaded model with its tokenizer, and the name and version clients and the request log see."""

    model: GPT
    tokenizer: Tokenizer
    name: str
    version: str
    eos_id: int | None  # generation stops there; also the start of an empty prompt

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
        if self.path is not None:
            self.movable = False
            self.name = cfg.serve.served_model_name or (path if path.is_dir() else path.parent).name
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
        else:
            p = self.path
            if p.is_dir() and (p / "config.json").is_file() and not (p / "ckpt.safetensors").is_file():
                from lmops.hf import import_hf

                model, folder = import_hf(p), p
            else:
                ckpt = Checkpoint(p)
                model, folder = ckpt.model(), ckpt.path.parent
            version = self._file_version()
        tok = load_tokenizer(folder)
        return ServedModel(model.to(device).eval(), tok, self.name, version, _eos_id(tok, folder))

    def _file_version(self) -> str:
        p = self.path
        if p.is_dir():
            p = p / "ckpt.safetensors" if (p / "ckpt.safetensors").is_file() else p / "model.safetensors"
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


def chat_turns(messages: list[ChatMessage], roles: dict[str, str]) -> list[tuple[str, str]]:
    """(label, content) per message; the content of text parts joined."""
    turns = []
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
        turns.append((roles[m.role], content or ""))
    return turns


def render_chat(turns: list[tuple[str, str]], assistant: str) -> str:
    """A transcript a model trained on plain text can continue: 'Label: content' lines, then 'Assistant:'."""
    return "".join(f"{label}: {content}\n" for label, content in turns) + f"{assistant}:"
