"""Rules for user-supplied text: invisible characters, and quoting values safely in errors.

Prompts are checked for what a person can see (a prompt of NULs, zero-width spaces or a bare
ANSI escape is blank) and cleaned of what no model should receive (control characters and
terminal escape sequences). Error messages quote a user's value only through `quote_value`,
which refuses to echo anything long or credential-like: a key pasted into a manifest cell
must not travel on into logs, summaries and artifacts.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any

__all__ = [
    "char_class",
    "clean_text",
    "find_char",
    "has_visible_text",
    "looks_like_secret",
    "quote_value",
]

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other two-byte escapes, and the 8-bit CSI.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
)
_KEPT_CONTROLS = frozenset("\t\n\r")
# Nothing a person (or a text encoder) reads as content: controls, format characters such as
# zero-width spaces, surrogates, private-use and unassigned code points, separators, and
# combining marks with nothing to combine with.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})
# Letters by category that render as nothing (Hangul fillers, the blank Braille pattern).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def clean_text(text: str) -> str:
    """`text` without terminal escape sequences and control characters (tab and newlines are
    kept). Format characters stay: zero-width joiners carry meaning in emoji and in scripts
    such as Persian, and harm nothing."""
    text = _ANSI.sub("", text)
    return "".join(ch for ch in text if ch in _KEPT_CONTROLS or unicodedata.category(ch) != "Cc")


def has_visible_text(text: str) -> bool:
    """True when `text` has at least one character a person would see."""
    return any(
        unicodedata.category(ch) not in _INVISIBLE_CATEGORIES and ch not in _BLANK_LETTERS
        for ch in text
    )


def char_class(ch: str) -> str:
    """What kind of character `ch` is, in words, without showing it."""
    if ch == " ":
        return "a space"
    category = unicodedata.category(ch)
    if category == "Cc":
        return "a control character" if ch not in "\t\n\r" else "a tab or line break"
    if category == "Cf":
        return "an invisible format character (such as a zero-width space)"
    if category == "Cs":
        return "a lone surrogate (not valid Unicode)"
    if category in ("Zs", "Zl", "Zp"):
        return "a non-ASCII space or line separator"
    if ord(ch) > 0x7E:
        return "a non-ASCII character"
    return "a printable ASCII character"


def find_char(text: str, categories: frozenset[str]) -> tuple[int, str] | None:
    """The 1-based position and class of the first character of `text` in one of the
    Unicode `categories` (plus the ASCII space when "Zs" is among them), else None."""
    for position, ch in enumerate(text, start=1):
        if unicodedata.category(ch) in categories:
            return position, char_class(ch)
    return None


# Prefixes of common API keys and tokens: OpenAI/Stripe-style sk-/pk-/rk-, webhook secrets,
# GitHub, GitLab, Slack, Hugging Face, Google API keys, AWS access key ids, JWTs, PEM blocks.
_SECRET_PREFIX = re.compile(
    r"(?:^|[^A-Za-z0-9])(?:"
    r"(?:sk|pk|rk)[-_][A-Za-z0-9_-]{8,}"
    r"|whsec_\S{4,}"
    r"|gh[pousr]_[A-Za-z0-9]{10,}|github_pat_\w{10,}"
    r"|glpat-[A-Za-z0-9_-]{10,}"
    r"|xox[abposr]-[A-Za-z0-9-]{8,}"
    r"|hf_[A-Za-z0-9]{10,}"
    r"|AIza[A-Za-z0-9_-]{20,}"
    r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{12,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}"
    r")"
    r"|-----BEGIN|\bbearer\s|\bbasic\s+[A-Za-z0-9+/=]{8,}",
    re.IGNORECASE,
)
# Query parameters of presigned URLs (S3, GCS, Azure SAS, CDN tokens) and userinfo in URLs.
_SIGNED_URL = re.compile(
    r"[?&;](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|sig|token|access_token|auth|key|"
    r"api_key|apikey|secret|password|credential|expires|se|sp|sv|st|policy|key-pair-id)="
    r"|://[^/@\s]*:[^/@\s]*@",
    re.IGNORECASE,
)
# Runs that could be a key: base64/hex alphabets without the separators of ordinary names
# (snake_case and kebab-case file names split into short words).
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+=]{20,}")
# Base64 keys (AWS secret keys, say) also hold "/": a long run mixing all three classes.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{32,}")


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def looks_like_secret(text: str) -> bool:
    """True when `text` looks like (or contains) a credential: a known key prefix, a bearer
    or basic authorization, a presigned-URL parameter, or a long high-entropy token."""
    if _SECRET_PREFIX.search(text) or _SIGNED_URL.search(text):
        return True
    for run in _TOKEN_RUN.findall(text):
        digits = sum(c.isdigit() for c in run)
        has_alpha = any(c.isalpha() for c in run)
        # Hex keys sit near 4 bits per character, base64 ones near 5; words and numbers
        # ("takeoneFinal2023") have fewer distinct characters or lack digits or letters.
        if digits >= 2 and has_alpha and _entropy_bits(run) >= 3.5:
            return True
    for run in _BASE64_RUN.findall(text):
        classes = (str.isupper, str.islower, str.isdigit)
        if all(any(test(c) for c in run) for test in classes) and _entropy_bits(run) >= 4.0:
            return True
    return False


def quote_value(value: Any, *, limit: int = 60) -> str:
    """`value` quoted for an error message when that is safe, else where it is and how long.

    A value is shown (as its repr, so control characters and escapes stay inert) only when
    the repr is at most `limit` characters and nothing in it looks like a credential.
    """
    if isinstance(value, bool | int | float) or value is None:
        text = repr(value)
        if len(text) <= limit:
            return text
        return f"(a number of {len(text)} characters, not shown)"
    if not isinstance(value, str):
        return f"(a {type(value).__name__} value, not shown)"
    if looks_like_secret(value):
        return f"(a {len(value)}-character value that looks like a credential, not shown)"
    text = repr(value)
    if len(text) > limit:
        return f"(a {len(value)}-character value, not shown)"
    return text
