"""Text that XML 1.0 can carry: the one filter every TwiML string goes through.

twilio's builder escapes `&`, `<` and `"`, but passes control characters, lone
surrogates and non-characters straight into the document, which is then not
well-formed XML (or cannot be encoded as UTF-8 at all), and Twilio plays its
generic application error. Such characters reach us from callers' transcripts,
the model, tools, prompt files and settings; none of them can be spoken, so
they are dropped wherever they come from.
"""

from __future__ import annotations

import re

from twilio.twiml import TwiML

# XML 1.0 Char: #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF].
# Also dropped, as the spec advises: C1 controls and the non-characters
# (U+FDD0..U+FDEF and the last two code points of every plane).
_NOT_SPEAKABLE_XML = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(1, 17))
    + "]"
)


def xml_safe(text: str) -> str:
    """`text` without the characters an XML 1.0 document cannot (or should not) hold."""
    return _NOT_SPEAKABLE_XML.sub("", text)


def make_safe(doc: TwiML) -> TwiML:
    """Filter every text and attribute value of a TwiML tree in place; returns `doc`.

    Walking the finished tree, rather than filtering at each call site, covers
    every verb and noun a builder adds, now and later.
    """
    if isinstance(doc.value, str):
        doc.value = xml_safe(doc.value)
    for name, value in doc.attrs.items():
        if isinstance(value, str):
            doc.attrs[name] = xml_safe(value)
    doc.verbs = [
        xml_safe(child) if isinstance(child, str) else make_safe(child) for child in doc.verbs
    ]
    return doc
