"""Content rules: personal data (PII), secrets, blocklisted terms and prompt injection.

One set of rules for the whole life cycle: the data pipeline scrubs PII from the corpus, the
evaluation suite checks samples with them, and the server moderates prompts and completions with them
(`moderate`, an action per rule from SafetyConfig). Keeping them in one place means a model is judged,
and served, by the rules its training data was cleaned with.

Everything is regular expressions compiled once at import, plus a check where a regex alone guesses
too much (Luhn for card numbers, `ipaddress` for IPv6). Choices a reader could make otherwise:
- A dotted quad with valid octets ("1.2.3.4") is an IP address even if it is a version number: the two
  cannot be told apart, and redacting a version costs less than leaking an address. With a prefix or
  more parts ("v1.2.3.4", "1.2.3.4.5") it is not an address.
- A phone number has 9 to 15 digits (E.164's maximum) written the way people write phone numbers: with
  a +country code, as (555) 123-4567 / 555-123-4567, or nationally with a leading 0 and separators
  ("020 7946 0958", "06 12 34 56 78"). A bare run of digits is not a phone number: years, page numbers,
  ids and amounts in prose are bare digits far more often than phone numbers are.
- Card numbers must pass the Luhn check: a random 16-digit number fails it 9 times in 10.
- A generic `password=...`/`token: ...` assignment is a secret when its value is long (16+ characters)
  or mixes in digits or symbols (8+): "password: required" in prose is not one. Only the value is
  replaced, so the text still reads "password=[SECRET]".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lmops.config import SafetyConfig

PII_KINDS = ("email", "phone", "ip", "credit_card", "secret")

# Prompt-injection heuristics: rule name -> patterns (any one matches; case-insensitive, ^ at any line
# start). They flag text for a closer look, they are not proof. injection_hits reports them in this order.
INJECTION_RULES: dict[str, list[str]] = {
    "ignore_instructions": [  # "ignore all previous instructions", "disregard the above rules"
        r"\b(?:ignore|disregard|forget|override|skip)\s+(?:(?:all|any|every|the|your|my|of|these|those)\s+)*"
        r"(?:previous|prior|above|earlier|preceding|original|system|initial)\s+"
        r"(?:instructions?|prompts?|rules|directions|directives|guidelines|messages?|context)\b",
    ],
    "reveal_system_prompt": [  # "reveal your system prompt", "what are your hidden instructions"
        r"\b(?:reveal|show|print|repeat|output|display|leak|dump|tell\s+me|what\s+(?:is|are|was|were))\s+"
        r"(?:me\s+)?(?:your|the)\s+(?:(?:full|exact|initial|original|hidden|secret|system|developer)\s+)+"
        r"(?:prompts?|instructions?|messages?)\b",
    ],
    "role_override": [  # "you are now DAN", "act as an unrestricted AI", "developer mode"
        r"\byou\s+are\s+(?:now|no\s+longer)\s+(?:(?:an?|the|my|in|bound|restricted)\s+)?(?:\w+\s+){0,3}?"
        r"(?:assistant|AI|chatbot|bot|model|persona|character|DAN|unrestricted|unfiltered|jailbroken|uncensored"
        r"|mode|by)\b",
        r"\b(?:act|pretend|roleplay)\s+(?:as|to\s+be)\s+(?:an?\s+)?"
        r"(?:DAN|unrestricted|unfiltered|jailbroken|uncensored|evil)\b",
        r"\b(?:DAN|developer|god)\s+mode\b|\bdo\s+anything\s+now\b|\bjailbreak(?:en|ing)?\b",
    ],
    "delimiter_injection": [  # chat-template tokens or a fake "### System:" header inside user text
        r"<\|im_start\|>\s*system|<\|(?:system|im_end|endoftext|eot_id)\|>|<<\s*SYS\s*>>|\[/?INST\]",
        r"^[ \t]*#{2,}[ \t]*(?:system|assistant|instructions?)[ \t]*:",
    ],
    "exfiltration": [  # "send the conversation to https://...", a markdown image whose URL carries data
        r"\b(?:send|post|upload|forward|transmit|exfiltrate|leak|email)\b[^\n]{0,80}?\bto\s+"
        r"(?:https?://|ftp://|[\w.+-]+@[\w-]+\.)",
        # alt text without "[" and a URL without "!" before its "?...=": a run of "![x](http://..." is then
        # read once, not once per image (any "?" followed by "=" would read the rest of the run again)
        r"!\[[^\[\]\n]*\]\(https?://[^)\s?!]*\?[^)\s=!]*=",
    ],
}

# Placeholders redact_pii puts in place of each kind.
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}

# Overlapping findings: the longest wins; at equal length, the earlier kind here (the more specific).
PRIORITY = {"secret": 0, "credit_card": 1, "email": 2, "ip": 3, "phone": 4}

# A secret-sounding name, ':' or '=', and its value (group 1; see _is_assigned_secret). The name comes
# first in the pattern, so only an assignment to such a name is read at all: in
# "url=https://x/?token=abc123xyz" the value of url (no secret) is never read, that of token is. The value
# is consumed, so a run of assignments ("password=password=...") is read once, not once per separator.
_ASSIGNED_VALUE = re.compile(
    r"\b(?i:api[_-]?key|apikey|api[_-]?secret|secret[_-]?key|client[_-]?secret|access[_-]?key|access[_-]?token|"
    r"auth[_-]?token|bearer|token|secret|password|passwd|pwd)[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"',;&]{8,})"
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)")  # octets checked by _is_ipv4
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w.+/-])(?:"
    r"(?:\+|\b00)[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{2,5}){1,5}|\+[1-9]\d{8,14}"  # international
    r"|(?:\b1[ .-])?(?:\(\d{3}\)[ ]?|\b\d{3}[.-])\d{3}[ .-]\d{4}|\b\d{3} \d{3} \d{4}"  # US
    r"|\b0\d{1,4}(?:[ /-]\d{2,8}){1,4}"  # national, with trunk 0 (most of Europe, UK)
    r")(?![\w]|[.-]\d)"
)
_CARD = re.compile(
    r"\d(?<![\w-]\d)(?:\d{12,18}|\d{3}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{3}([ -])\d{6}\2\d{4,5})(?![\w]|-\d)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits) and len(set(digits)) > 1


def _is_phone(m: re.Match) -> bool:
    return 9 <= sum(ch.isdigit() for ch in m.group()) <= 15


def _is_ipv4(m: re.Match) -> bool:
    return all(int(octet) <= 255 and (octet == "0" or octet[0] != "0") for octet in m.group().split("."))


def _is_ipv6(m: re.Match) -> bool:
    s = m.group()
    if sum(1 for g in re.split(r"[:.]", s) if g) < 2:  # "::" or "a::" in prose, not an address
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _is_assigned_secret(m: re.Match) -> bool:
    """A long or non-alphabetic value after a secret-sounding name: `api_key = "..."`, `password: ...`."""
    value = m.group(1)
    return len(value) >= 16 or not value.isalpha()


def _has_digit(m: re.Match) -> bool:
    return any(ch.isdigit() for ch in m.group())


class _PrivateKeyBlocks:
    """PEM and PGP private key blocks, BEGIN line to END line. As one regex (BEGIN, lazily anything, END)
    every BEGIN without an END after it would read the rest of the text: many of them, quadratic time.
    Here a BEGIN is looked at only while an END follows somewhere, so the text is read about twice."""

    _LABEL = r"[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,20}-----"  # bounded: real labels are a few words
    pattern = rf"-----BEGIN {_LABEL}.*?-----END {_LABEL}"
    _begin = re.compile(rf"-----BEGIN {_LABEL}")
    _end = re.compile(rf"-----END {_LABEL}")
    _block = re.compile(pattern, re.DOTALL)

    def finditer(self, text: str) -> Iterable[re.Match]:
        pos = 0
        while (begin := self._begin.search(text, pos)) is not None:
            if self._end.search(text, begin.end()) is None:
                return  # no END after this BEGIN, so none after any later one either
            m = self._block.match(text, begin.start())
            yield m
            pos = m.end()


_DIGIT = re.compile(r"\d")
# what every match of _IPV4 and of _IPV6 holds, in patterns the regex engine scans for quickly
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")


def _holds(*needles: str) -> Callable[[str, int], bool]:
    return lambda text, digits: any(n in text for n in needles)


# _CARD and _IPV4 start with \d and look behind it, rather than starting with a lookbehind: a pattern
# that starts with a character class lets the regex engine skip ahead to digits, several times faster.
#
# Each rule: (kind, a gate, pattern, the group that is the finding, a check the match must pass). The
# gate is a cheap test of the whole text (is a needle in it; does it hold enough digits, counted once)
# that no text with a finding fails, so most texts skip most patterns: prose rarely holds the 9 digits
# a phone number needs, and the phone pattern alone cost half of moderating a completion.
_RULES: list[tuple[str, Callable[[str, int], bool], re.Pattern, int, Callable[[re.Match], bool] | None]] = [
    ("secret", _holds("PRIVATE KEY"), _PrivateKeyBlocks(), 0, None),  # PEM and PGP private key blocks
    ("secret", _holds("AKIA", "ASIA"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), 0, None),  # AWS access key id
    ("secret", _holds("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),  # GitHub tokens
     re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b"), 0, None),
    ("secret", _holds("sk-"),  # OpenAI-style keys (with at least one digit: "sk-" words in prose have none)
     re.compile(r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}"), 0, _has_digit),
    ("secret", _holds("xox"), re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"), 0, None),  # Slack
    ("secret", _holds("AIza"), re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), 0, None),  # Google API key
    ("secret", _holds("eyJ"),  # JWT: base64url JSON header and payload, then a signature
     re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"), 0, None),
    ("secret", _holds(":", "="), _ASSIGNED_VALUE, 1, _is_assigned_secret),
    ("credit_card", lambda text, digits: digits >= 13, _CARD, 0, _is_card),  # 13 to 19 digits
    ("email", _holds("@"), _EMAIL, 0, None),
    ("ip", lambda text, digits: digits >= 4 and _IPV4_HINT.search(text) is not None, _IPV4, 0, _is_ipv4),
    ("ip", lambda text, digits: _IPV6_HINT.search(text) is not None, _IPV6, 0, _is_ipv6),
    ("phone", lambda text, digits: digits >= 9, _PHONE, 0, _is_phone),  # 9 to 15 digits
]


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def _check_kinds(kinds: Iterable[str]) -> set[str]:
    kinds = set(kinds)
    unknown = kinds - set(PII_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(PII_KINDS)}")
    return kinds


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[Finding]:
    """Non-overlapping PII findings in text, in order of position."""
    wanted = _check_kinds(kinds)
    candidates: list[Finding] = []
    digits = len(_DIGIT.findall(text))  # \d, as the patterns read it: any script's decimal digits
    for kind, gate, pattern, group, check in _RULES:
        if kind not in wanted or not gate(text, digits):
            continue
        for m in pattern.finditer(text):
            if check is None or check(m):
                candidates.append(Finding(kind, m.start(group), m.end(group)))
    candidates.sort(key=lambda f: (f.start - f.end, PRIORITY[f.kind], f.start))
    taken = bytearray(len(text))  # 1 where a kept finding is; findings of one pattern never overlap, so
    kept: list[Finding] = []  # marking and checking read each character a few times at most
    for f in candidates:
        if taken.find(1, f.start, f.end) == -1:
            taken[f.start:f.end] = b"\x01" * (f.end - f.start)
            kept.append(f)
    kept.sort(key=lambda f: f.start)
    return kept


def redact_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """text with each finding replaced by its placeholder ([EMAIL], [SECRET], ...), and counts per kind."""
    return _redact(text, find_pii(text, kinds))


def _redact(text: str, findings: list[Finding]) -> tuple[str, dict[str, int]]:
    counts = {kind: 0 for kind in PII_KINDS}
    if not findings:
        return text, counts
    parts, pos = [], 0
    for f in findings:
        parts += [text[pos : f.start], PLACEHOLDERS[f.kind]]
        counts[f.kind] += 1
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), counts


@lru_cache(maxsize=64)
def _blocklist_pattern(terms: tuple[str, ...]) -> tuple[re.Pattern, dict[str, str]]:
    keys = {" ".join(t.casefold().split()): t for t in terms if t.strip()}
    alternatives = [r"\s+".join(map(re.escape, k.split())) for k in sorted(keys, key=len, reverse=True)]
    # A lookahead, so matches at neighbouring positions are all found even where terms overlap.
    return re.compile(r"(?<!\w)(?=(" + "|".join(alternatives) + r")(?!\w))", re.IGNORECASE), keys


def blocklist_hits(text: str, terms: list[str]) -> list[str]:
    """The terms (as given) that occur in text as whole words or phrases, ignoring case; each once,
    in the order of terms. Spaces in a phrase match any run of whitespace. Where two terms start at
    the same place ("bad", "bad word"), only the longer one is reported."""
    if not terms:
        return []
    pattern, keys = _blocklist_pattern(tuple(terms))
    if not keys:
        return []
    found = {keys[" ".join(m.group(1).casefold().split())] for m in pattern.finditer(text)}
    return [t for t in dict.fromkeys(terms) if t in found]


_INJECTION = {
    name: re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.MULTILINE)
    for name, patterns in INJECTION_RULES.items()
}


def injection_hits(text: str) -> list[str]:
    """Names of the INJECTION_RULES that text matches, in table order."""
    return [name for name, pattern in _INJECTION.items() if pattern.search(text)]


# ---------------------------------------------------------------------------------------------- moderation

Action = Literal["allow", "flag", "redact", "block"]

# When several rules hit, the strongest action wins.
STRENGTH: dict[str, int] = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


@dataclass(frozen=True)
class Moderation:
    """The verdict on one text: what to do, the text to use (PII replaced when the PII rule redacts),
    and what each rule found: {"pii": ["email"], "blocklist": ["foo"], "injection": ["role_override"]},
    only the rules that found something."""

    action: Action
    text: str
    hits: dict[str, list[str]]
    findings: tuple[Finding, ...] = ()  # the PII spans of the original text replaced in .text

    def position(self, i: int) -> int:
        """Where position i of the original text is in .text; a replaced span that i cuts is left whole
        after it (i moves back to the span's start)."""
        shift = 0
        for f in self.findings:
            if f.end <= i:
                shift += len(PLACEHOLDERS[f.kind]) - (f.end - f.start)
            elif f.start < i:
                return f.start + shift
        return i + shift


def moderate(text: str, cfg: SafetyConfig, direction: Literal["input", "output"]) -> Moderation:
    """Check a prompt (input) or a completion (output) with find_pii/redact_pii, blocklist_hits and
    injection_hits, each rule acting as cfg says (pii_action, blocklist_action, injection_action).

    - Injection rules apply to input only: they describe an attack on the model through its prompt,
      and a completion that happens to say "ignore previous instructions" attacks nothing.
    - The action is the strongest among the rules that hit (block > redact > flag > allow); a rule set
      to "allow" still reports its hits, so they can be counted.
    - The returned text has PII replaced when pii_action is redact, and also when it is block: a
      blocked text is never served but may be logged, and it holds the PII that got it blocked.
    - Blocklist and injection rules read the original text, so redaction never hides a term from them.
    """
    if direction not in ("input", "output"):
        raise ValueError(f"direction {direction!r}: expected 'input' or 'output'")
    findings = find_pii(text, cfg.pii_kinds)
    redacted, counts = _redact(text, findings)
    found = {
        "pii": [kind for kind in PII_KINDS if counts[kind]],
        "blocklist": blocklist_hits(text, cfg.blocklist),
        "injection": injection_hits(text) if direction == "input" else [],
    }
    actions = {"pii": cfg.pii_action, "blocklist": cfg.blocklist_action, "injection": cfg.injection_action}
    hits = {rule: names for rule, names in found.items() if names}
    action = max((actions[rule] for rule in hits), key=STRENGTH.__getitem__, default="allow")
    scrub = "pii" in hits and cfg.pii_action in ("redact", "block")
    return Moderation(action, redacted, hits, tuple(findings)) if scrub else Moderation(action, text, hits)


# ---------------------------------------------------------------------------------------------- streaming

# Characters a phone or card number is written with (digits are tested with str.isdigit, as \d reads them).
_NUMBER_CHARS = frozenset(" .-()+/")


@lru_cache(maxsize=64)
def _term_prefixes(terms: tuple[str, ...]) -> frozenset[str]:
    """Every beginning of every blocklisted term, case-folded, words joined by one space."""
    keys = {" ".join(t.casefold().split()) for t in terms if t.strip()}
    return frozenset(k[:n] for k in keys for n in range(1, len(k) + 1))


def unsettled(text: str, cfg: SafetyConfig, limit: int) -> int:
    """Where the part of text that more text could still change under moderate(text + more, cfg) starts.

    A stream sends text[:unsettled(...)] and holds the rest: what may be PII or a blocklisted term still
    being written. By kind: an e-mail, an IP address, a key or token, a secret's value are written without
    whitespace, so the last run of non-whitespace is held; a phone or card number is digits and separators
    (` .-()+/`), so the last run of those from a digit, `+` or `(`; a blocklisted term, from the earliest
    word start whose text so far begins a term. Only rules that change or end a stream count (pii_action redact or block,
    blocklist_action block): a flag changes nothing sent. Never more than the last `limit` characters
    (serve.moderation_holdback_chars): longer PII may be partly sent before it is recognised. The scan
    reads at most `limit` characters, whatever the length of text.
    """
    n = len(text)
    floor = max(0, n - limit)
    cut = n
    kinds = set(cfg.pii_kinds) if cfg.pii_action in ("redact", "block") else set()
    if kinds & {"email", "ip", "secret"}:
        i = n
        while i > floor and not text[i - 1].isspace():
            i -= 1
        cut = min(cut, i)
    if kinds & {"phone", "credit_card"}:
        i = n
        while i > floor and (text[i - 1].isdigit() or text[i - 1] in _NUMBER_CHARS):
            i -= 1
        while i < n and not (text[i].isdigit() or text[i] in "+("):  # where a number can start
            i += 1
        cut = min(cut, i)
    if cfg.blocklist_action == "block" and cfg.blocklist and cut > floor:
        prefixes = _term_prefixes(tuple(cfg.blocklist))
        for i in range(floor, cut):  # the earliest start wins: stop there
            if i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):
                continue  # terms start at a word boundary
            tail = text[i:].casefold()
            norm = " ".join(tail.split()) + (" " if tail[-1:].isspace() else "")
            if norm in prefixes:
                cut = i
                break
    return cut
