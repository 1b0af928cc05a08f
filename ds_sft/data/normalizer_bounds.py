"""How much a tokenizer's normalizer can change a text's length, read from its configuration alone.

The normalizer (``tokenizer.json``'s ``"normalizer"``) runs in the tokenizers library on every text
before it is split, and its whole output is held: a ``Replace`` of ``e`` by 100,000 characters turned
30 short rows into 5 GB inside one ``encode_batch``, past every bound ``prepare`` sets from the size of
the data. :func:`length_change` bounds it per type, and :func:`refuse_growing_normalizer` refuses a
tokenizer whose normalizer can grow a text past :data:`MOST_PER_CHARACTER` times (no real vocabulary
comes near: Unicode's NFKC, the most of any, is 18) or add more than :data:`MOST_ADDED` characters.

The bound also tells :class:`ds_sft.data.tokenize.LengthFloor` whether an ASCII text can be measured
by its length alone (:attr:`LengthChange.keeps_ascii`): ``Strip``, ``Nmt``, a shrinking ``Replace``
or a SentencePiece charsmap can make it shorter, and a floor from its raw length would then drop a
row that fits; and whether a huge text can be measured by a prefix (:attr:`LengthChange.prefix_bounded`):
a regex ``Replace`` can match across any length (``a[^b]*b`` removes a megabyte once its ``b`` comes),
so a prefix may normalize to more than the whole.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass

from ds_sft.errors import UserError

MOST_PER_CHARACTER = 64
MOST_ADDED = 1024

# Characters out per character in, at most, for the normalizers without settings. Unicode forms: the
# longest normalization of one code point (U+FDFA is 18 in NFKC; measured over every code point with
# unicodedata). Lowercase: Rust's char::to_lowercase yields at most 3. ByteLevel: one character per
# UTF-8 byte. BertNormalizer: a CJK character gets a space each side (3), another is decomposed (NFD,
# 4) and each part lowercased (3).
PER_CHARACTER = {
    "NFC": 3,
    "NFD": 4,
    "NFKC": 18,
    "NFKD": 18,
    "Lowercase": 3,
    "StripAccents": 1,
    "Strip": 1,
    "Nmt": 1,
    "ByteLevel": 4,
    "BertNormalizer": 12,
}
UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
# Types that leave an ASCII text as it is, so only what came before them decides its length.
ASCII_UNCHANGED = UNICODE_FORMS | {"Lowercase", "StripAccents"}


@dataclass(frozen=True)
class LengthChange:
    """A normalized text has at most ``per_character * len(text) + added`` characters; whether it can
    have fewer UTF-8 bytes than it went in with, for an ASCII text and for any; whether an ASCII text
    comes out ASCII (what a later part of a sequence then sees); whether a prefix of a text normalizes
    to at most the whole's bytes, give or take a few where the prefix ends (every type but a regex
    ``Replace``: each changes a character, or a run of a bounded length, at a time)."""

    per_character: float = 1.0
    added: int = 0
    keeps_ascii: bool = True
    keeps_any: bool = True
    ascii_out: bool = True
    prefix_bounded: bool = True

    def then(self, later: LengthChange) -> LengthChange:
        """This change followed by ``later``."""
        return LengthChange(
            self.per_character * later.per_character,
            self.added * later.per_character + later.added,
            self.keeps_ascii and (later.keeps_ascii if self.ascii_out else later.keeps_any),
            self.keeps_any and later.keeps_any,
            self.ascii_out and later.ascii_out,
            self.prefix_bounded and later.prefix_bounded,
        )


def length_change(part: dict | None) -> LengthChange:
    """The bound of one normalizer configuration (a ``tokenizer.json``'s ``"normalizer"`` value)."""
    if part is None:
        return LengthChange()
    kind = part.get("type")
    if kind == "Sequence":
        total, forms = LengthChange(), []
        # Unicode forms in a row are one form (NFD then NFKC is NFKC; any with a K is the K form of the
        # last): the run counts once, as its longest
        for item in [*(part.get("normalizers") or ()), None]:
            if isinstance(item, dict) and item.get("type") in UNICODE_FORMS:
                forms.append(item["type"])
                continue
            if forms:
                total = total.then(length_change({"type": max(forms, key=PER_CHARACTER.get)}))
                forms = []
            if item is not None:
                total = total.then(length_change(item))
        return total
    if kind == "Prepend":
        prepend = str(part.get("prepend", ""))
        return LengthChange(added=len(prepend), ascii_out=prepend.isascii())
    if kind == "Replace":
        return _replace(part)
    if kind == "Precompiled":  # any text to any text
        longest = max(1, _longest_charsmap_text(part))
        return LengthChange(longest, keeps_ascii=False, keeps_any=False, ascii_out=False)
    if kind in ASCII_UNCHANGED:  # but some other text comes out shorter ("\ufb01" -> "fi")
        return LengthChange(PER_CHARACTER[kind], keeps_any=False)
    if kind == "ByteLevel":  # each byte becomes a character of one or two bytes (" " -> "\u0120")
        return LengthChange(PER_CHARACTER[kind], ascii_out=False)
    if kind in PER_CHARACTER:  # Strip, Nmt and Bert drop some ASCII characters
        return LengthChange(PER_CHARACTER[kind], keeps_ascii=False, keeps_any=False)
    raise UserError(f"unknown normalizer type {kind!r}")


def _replace(part: dict) -> LengthChange:
    pattern, content = part.get("pattern") or {}, str(part.get("content", ""))
    literal = pattern.get("String") if isinstance(pattern, dict) else None
    if isinstance(literal, str) and literal:
        grows = len(content.encode()) >= len(literal.encode())
        return LengthChange(max(1.0, len(content) / len(literal)), 0, grows, grows, content.isascii())
    # a regular expression (or an empty string) may match a single character or none, between any two,
    # or a run of any length
    return LengthChange(1 + len(content), len(content), False, False, content.isascii(), prefix_bounded=False)


def _longest_charsmap_text(part: dict) -> int:
    """The longest replacement text in a SentencePiece charsmap: a little-endian uint32 trie size, the
    trie, then the replacement texts, each ended by a NUL byte."""
    try:
        blob = base64.b64decode(part.get("precompiled_charsmap") or "", validate=True)
        (trie_size,) = struct.unpack_from("<I", blob)
    except (ValueError, TypeError, struct.error):
        return 0  # the tokenizers library refuses such a charsmap when the file is read
    texts = blob[4 + trie_size :].split(b"\0")
    return max(len(text.decode("utf-8", "replace")) for text in texts)


def normalizer_change(backend) -> LengthChange:
    """The :class:`LengthChange` of a ``tokenizers.Tokenizer``'s normalizer."""
    normalizer = backend.normalizer
    return length_change(json.loads(normalizer.__getstate__()) if normalizer is not None else None)


def refuse_growing_normalizer(backend, name: str) -> None:
    """Refuse in one line a normalizer that can grow a text past :data:`MOST_PER_CHARACTER` times or
    add more than :data:`MOST_ADDED` characters to it."""
    try:
        change = normalizer_change(backend)
    except UserError as err:
        raise UserError(f"tokenizer {name}: {err}; ds-sft cannot bound what it does to a text") from None
    if change.per_character > MOST_PER_CHARACTER or change.added > MOST_ADDED:
        raise UserError(
            f"tokenizer {name}: its normalizer can make a text {change.per_character:,.0f} times longer "
            f"plus {change.added:,} characters (ds-sft takes at most {MOST_PER_CHARACTER} times and "
            f"{MOST_ADDED:,}: no real vocabulary comes near, and every row is held normalized in memory); "
            'fix the "normalizer" of its tokenizer.json'
        )
