"""Secrets out of everything the harness stores, logs, exports or prints (docs/reliability.md, "Secrets").

``redact(text)`` replaces every secret it knows with ``***`` (SQLAlchemy's own mask for a hidden
password); ``redact_data(obj)`` does it to every string inside a dict or list (a run's config).
They are called at the few places everything passes through: the store's writes (episode
errors, a run's status reason and config), the JSON log lines, the CLI's one-line error printer
and its traceback printer, the printed resume command, the response texts of provider errors
(before they are cut to length, so no half key survives the cut).

What counts as a secret:

1. The value of every environment variable named like a credential: one of its ``_``-separated
   words ends with KEY, TOKEN, SECRET, PASSWORD or PASSWD, or is CREDENTIAL(S)
   (``OPENAI_API_KEY``, ``HF_TOKEN``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
   ``AWS_SESSION_TOKEN``, ``AZURE_CLIENT_SECRET``, ``PGPASSWORD``, ``GOOGLE_APPLICATION_CREDENTIALS``;
   not ``MAX_TOKENS`` or ``TOKENIZERS_PARALLELISM``), and every key handed over explicitly
   (``remember``; ``LLMConfig.api_key`` does), matched in any letter case. Only values of at
   least ``MIN_SECRET_CHARS`` characters: masking ``true`` or ``1`` everywhere would wreck the
   text, and no real key is that short.
2. Credentials in URLs, by shape and whatever their length: the user-info part
   (``scheme://user:password@host`` -> ``scheme://user:***@host``; a lone ``scheme://token@host``
   -> ``scheme://***@host``) and the values of query parameters named like credentials
   (``?api_key=``, ``?key=``, ``?token=``, ``?sig=``, ``?password=``, ...). These credentials of the
   URLs on the command line or in the environment (``--db``, ``--api-base``, ``HTTPS_PROXY``) also
   count as values under 1, so an error that quotes one outside its URL is masked too.
3. Well-known key shapes, for a key that reached a provider some other way (a config file, a
   proxy): ``sk-...`` (OpenAI, Anthropic), ``hf_...`` (Hugging Face), ``AKIA...`` (AWS),
   ``AIza...`` (Google), ``ghp_...`` and siblings (GitHub), and the token after ``Bearer``.

Not to be confused with ``trainers/summarizer/redact.py``, which hides a benchmark's answers from a
summarizer model.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from typing import Any

__all__ = ["MASK", "MIN_SECRET_CHARS", "redact", "redact_data", "remember", "is_credential_name", "known_secrets"]

MASK = "***"
MIN_SECRET_CHARS = 8

_CREDENTIAL_WORD = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$|^CREDENTIALS?$")

# scheme://user:password@ or scheme://user@: the user cannot hold white space, ":", "/", "?", "#"
# or "@"; the password runs to the "@" (SQLAlchemy allows a "/" in it).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/?#@]*)"
                           r"(?::(?P<password>[^\s@]*))?@")
_QUERY_CREDENTIAL = re.compile(
    r"(?P<name>[?&;](?:[^=&\s#]*(?:key|token|secret|passw|pwd|signature|credential|auth)[^=&\s#]*|sig)=)"
    r"(?P<value>[^&;,)\s#\"'<>]+)", re.IGNORECASE)
_KEY_SHAPES = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{16,}"           # OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-...)
    r"|\bhf_[A-Za-z0-9]{20,}"             # Hugging Face
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"     # AWS access key ids
    r"|\bAIza[0-9A-Za-z_\-]{35}"          # Google API keys
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"      # GitHub tokens
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=\-]{8,}")

_remembered: set[str] = set()


@lru_cache(maxsize=4096)  # called for every variable on every redact: names and values rarely change
def is_credential_name(name: str) -> bool:
    """Whether a variable or setting called ``name`` holds a credential (rule 1 above)."""
    return any(_CREDENTIAL_WORD.search(word) for word in name.upper().split("_") if word)


def remember(secret: str | None) -> None:
    """Treat ``secret`` (a key given explicitly, not through the environment) as a secret from now on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        _remembered.add(secret)


def known_secrets() -> frozenset[str]:
    """The secret values of this process right now (rule 1, plus the URL credentials of rule 2)."""
    found = set(_remembered)
    for name, value in os.environ.items():
        if is_credential_name(name):
            found.add(value.strip())
        found.update(_url_credentials(value))
    for arg in sys.argv:
        found.update(_url_credentials(arg))
    return frozenset(v for v in found if len(v) >= MIN_SECRET_CHARS and v != MASK)


@lru_cache(maxsize=4096)
def _url_credentials(text: str) -> tuple[str, ...]:
    """The passwords and credential query values of the URLs in ``text``."""
    if "://" not in text:
        return ()
    found = [m.group("password") for m in _URL_USERINFO.finditer(text) if m.group("password")]
    return tuple(found + [m.group("value") for m in _QUERY_CREDENTIAL.finditer(text)])


@lru_cache(maxsize=8)
def _values_pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    # Longest first: a key that contains another key is masked whole.
    return re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True)), re.IGNORECASE)


def _mask_userinfo(match: re.Match[str]) -> str:
    if match.group("password") is None:  # scheme://token@host: the lone user part may be the key
        return f"{match.group('scheme')}{MASK}@" if match.group("user") else match.group(0)
    return f"{match.group('scheme')}{match.group('user')}:{MASK}@"


def redact(text: str | None) -> str | None:
    """``text`` with every secret it holds replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_CREDENTIAL.sub(lambda m: m.group("name") + MASK, text)
    pattern = _values_pattern(known_secrets())
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _KEY_SHAPES.sub(MASK, text)


def redact_data(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists and tuples of JSON-like values) with every string redacted;
    a non-empty string under a key named like a credential (``api_key``) is masked whole."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(v, str) and v and isinstance(k, str) and is_credential_name(k)
                    else redact_data(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_data(v) for v in obj)
    return obj
