"""Turn an LLM's answer into something a text-to-speech voice can read well.

Models write for screens: markdown, bullet lists, emoji, links. On a phone line
those come out as "asterisk asterisk" or a minute of URL, so they are removed or
rewritten here, and the length is capped so TTS never reads a page.
XML escaping is not done here: twilio's TwiML builder does it.
"""

from __future__ import annotations

import re
import unicodedata

_CODE_FENCE = re.compile(r"```.*?(```|$)", re.S)
_INLINE_CODE = re.compile(r"`([^`]*)`")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^)]*)\)")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()\"']+", re.I)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*(.*?)\s*#*\s*$", re.M)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M)
_EMPHASIS = re.compile(r"(?<!\w)(\*\*|__|\*|_|~~)(?=\S)(.+?)(?<=\S)\1(?!\w)")
_TABLE_RULE = re.compile(r"^\s*\|?[\s:|-]+\|[\s:|-]*$", re.M)
_LEFTOVER_MARKUP = re.compile(r"(?<!\w)_+|_+(?!\w)|[*#|>`~]+")
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _speak_url(match: re.Match) -> str:
    """Say a link as its site name ("example dot com"), dropping path and query."""
    url = match.group(0).rstrip(".,;:!?")
    host = re.sub(r"^(?:https?://)?(?:www\.)?", "", url, flags=re.I).split("/")[0]
    host = host.split("?")[0].split("#")[0]
    return host.replace(".", " dot ") if host else ""


def _is_emoji(char: str) -> bool:
    category = unicodedata.category(char)
    # So = other symbols (emoji, dingbats); Cs/Co: surrogates and private use;
    # variation selectors and joiners glue emoji sequences together.
    return category in {"So", "Cs", "Co"} or char in "\ufe0f\u200d\u20e3"


def make_speakable(text: str, max_chars: int) -> str:
    """Plain sentences, no markup, at most `max_chars`, cut at a sentence end if possible."""
    text = _CODE_FENCE.sub(" ", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _URL.sub(_speak_url, text)
    text = _TABLE_RULE.sub(" ", text)
    text = _HEADING.sub(r"\1.", text)
    # A list item becomes its own sentence so the voice pauses between items.
    text = _BULLET.sub(". ", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _LEFTOVER_MARKUP.sub(" ", text)
    text = "".join(ch for ch in text if not _is_emoji(ch))
    text = _SPACES.sub(" ", text).strip()
    text = re.sub(r"(^|[.!?:]\s*)\.\s+", r"\1", text)  # bullets after a heading or colon
    text = re.sub(r"\s+([.,!?;:])", r"\1", text).lstrip(". ")
    return _cap(text, max_chars)


def _cap(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    window = text[:max_chars]
    ends = [m.end() for m in _SENTENCE_END.finditer(window)]
    if ends and ends[-1] >= max_chars // 3:
        return window[: ends[-1]].strip()
    cut = window.rsplit(" ", 1)[0].rstrip(",;:-")
    return cut + "..."
