"""The length bounds of tokenizer normalizers: sound on generated texts for every type the tokenizers
library has, a tokenizer whose normalizer grows text past them refused in one line, and the length
floor a true lower bound under normalizers that shorten ASCII text; and a tokenizer whose pipeline
panics on a plain sentence refused when it is loaded."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer
from tokenizers import normalizers as N

from ds_sft.data.normalizer_bounds import (
    MOST_ADDED,
    MOST_PER_CHARACTER,
    PER_CHARACTER,
    length_change,
    normalizer_change,
)
from ds_sft.data.tokenize import LengthFloor
from ds_sft.data.tokenizer import load_tokenizer
from ds_sft.errors import UserError


def charsmap(*replacements: str) -> N.Precompiled:
    """A SentencePiece charsmap that maps nothing (a trie of 256 empty units) but holds
    ``replacements`` as its texts: the bound reads them, whatever the trie reaches."""
    trie = bytes(4 * 256)
    texts = b"".join(text.encode() + b"\0" for text in replacements)
    return N.Precompiled(struct.pack("<I", len(trie)) + trie + texts)


def normalizers_of_every_kind() -> dict[str, N.Normalizer]:
    return {
        "NFC": N.NFC(),
        "NFD": N.NFD(),
        "NFKC": N.NFKC(),
        "NFKD": N.NFKD(),
        "Lowercase": N.Lowercase(),
        "StripAccents": N.Sequence([N.NFD(), N.StripAccents()]),
        "Strip": N.Strip(),
        "Nmt": N.Nmt(),
        "ByteLevel": N.ByteLevel(),
        "Bert": N.BertNormalizer(),
        "Bert, no lowercase": N.BertNormalizer(lowercase=False, strip_accents=True),
        "Prepend": N.Prepend("\u2581"),
        "llama-2": N.Sequence([N.Prepend("\u2581"), N.Replace(" ", "\u2581")]),
        "Replace, growing": N.Replace("e", "\u00e9\u00e9\u00e9"),
        "Replace, shrinking": N.Replace("  ", " "),
        "Replace, regex": N.Replace(Regex(" {2,}"), " "),
        "Replace, empty regex": N.Replace(Regex("x*"), "<>"),
        "Replace then NFKC": N.Sequence([N.Replace("abc", "\ufb00"), N.NFKC()]),
        "NFKC twice, lowercase": N.Sequence([N.NFKC(), N.Lowercase(), N.NFKD()]),
        "forms in a row": N.Sequence([N.NFD(), N.NFKC(), N.NFC(), N.Lowercase()]),
        "ByteLevel then NFKC": N.Sequence([N.ByteLevel(), N.NFKC()]),
        "Precompiled": charsmap("a", "xyz"),
    }


ALL = normalizers_of_every_kind()
# ASCII with runs of whitespace and control characters; and any text, with the characters that
# normalize to the most (U+FDFA), lowercase to more (U+0130) or shrink in bytes (U+FB01, U+212A)
ASCII = st.text(st.sampled_from(list("abcex  \t\n\x01\x7f")), max_size=60)
ANY = st.text(
    st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("\ufdfa\u0130\ufb01\u212a\u4e2d")),
    max_size=40,
)


def test_every_normalizer_type_has_a_bound():
    """A type the library adds later is refused by name (length_change raises), never guessed."""
    types = {
        name
        for name in dir(N)
        if isinstance(getattr(N, name), type) and issubclass(getattr(N, name), N.Normalizer)
    }
    known = set(PER_CHARACTER) | {"Sequence", "Prepend", "Replace", "Precompiled"}
    assert types - {"Normalizer"} <= known, types - known
    with pytest.raises(UserError, match="unknown normalizer type 'Shout'"):
        length_change({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Shout"}]})


@pytest.mark.parametrize("name", list(ALL))
@settings(max_examples=150, deadline=None)
@given(ascii_text=ASCII, any_text=ANY)
def test_bounds_hold_on_generated_texts(name, ascii_text, any_text):
    normalizer = ALL[name]
    change = length_change(json.loads(normalizer.__getstate__()))
    for text in (ascii_text, any_text):
        out = normalizer.normalize_str(text)
        assert len(out) <= change.per_character * len(text) + change.added, (text, out)
        if change.keeps_any or (change.keeps_ascii and text.isascii()):
            assert len(out.encode()) >= len(text.encode()), (text, out)
        if change.ascii_out and text.isascii():
            assert out.isascii(), (text, out)


def test_the_bounds_are_not_all_loose():
    """Each flag is false where a text shows it must be: the test above could not pass by a bound that
    claims nothing."""
    flags = {name: length_change(json.loads(n.__getstate__())) for name, n in ALL.items()}
    assert not flags["Strip"].keeps_ascii and N.Strip().normalize_str(" a") == "a"
    assert flags["llama-2"].keeps_any and flags["NFKC"].keeps_ascii and not flags["NFKC"].keeps_any
    assert (
        not flags["Replace then NFKC"].keeps_ascii and ALL["Replace then NFKC"].normalize_str("abc") == "ff"
    )
    assert flags["ByteLevel then NFKC"].keeps_ascii is False


def tokenizer_file(folder, normalizer: N.Normalizer | None, tiny_tokenizer_file) -> str:
    backend = Tokenizer.from_file(str(tiny_tokenizer_file))
    backend.normalizer = normalizer
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


GROWING = {
    "Replace by 100 characters": N.Replace("e", "x" * 100),
    "Replace, regex, by 64": N.Replace(Regex("e"), "x" * 64),
    "Prepend 2,000": N.Prepend("x" * 2000),
    "NFKC around Lowercase": N.Sequence([N.NFKC(), N.Lowercase(), N.NFKD()]),
    "charsmap text of 65": charsmap("a", "y" * 65),
    "Replace after Prepend": N.Sequence([N.Prepend("x" * 100), N.Replace("x", "yyyyyyyyyyyy")]),
}


@pytest.mark.parametrize("name", list(GROWING))
def test_a_normalizer_that_grows_text_past_the_bound_is_refused(name, tmp_path, tiny_tokenizer_file):
    path = tokenizer_file(tmp_path / "tok", GROWING[name], tiny_tokenizer_file)
    with pytest.raises(UserError) as refused:
        load_tokenizer(path)
    message = str(refused.value)
    assert "\n" not in message and "normalizer can make a text" in message and "tokenizer.json" in message


@pytest.mark.parametrize("name", sorted(set(ALL) - {"NFKC twice, lowercase", "ByteLevel then NFKC"}))
def test_real_normalizers_load(name, tmp_path, tiny_tokenizer_file):
    change = normalizer_change(
        load_tokenizer(tokenizer_file(tmp_path / "tok", ALL[name], tiny_tokenizer_file)).backend_tokenizer
    )
    assert change.per_character <= MOST_PER_CHARACTER and change.added <= MOST_ADDED


def test_a_growing_normalizer_stops_prepare_before_any_row_is_read(tmp_path, tiny_tokenizer_file, capsys):
    from ds_sft.cli import main
    from tests.data.helpers import write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "see", "output": "eee"}] * 4)
    path = tokenizer_file(tmp_path / "tok", GROWING["Replace by 100 characters"], tiny_tokenizer_file)
    out = tmp_path / "out"
    argv = [
        "prepare",
        "--source",
        f"s={tmp_path / 'rows.jsonl'}",
        "--tokenizer",
        path,
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "100 times longer" in last and not out.exists()


SHRINKING = [
    "Strip",
    "Nmt",
    "Bert",
    "Bert, no lowercase",
    "Replace, shrinking",
    "Replace, regex",
    "Replace then NFKC",
]


@pytest.mark.parametrize("name", SHRINKING)
@settings(max_examples=100, deadline=None)
@given(text=ASCII.map(lambda text: text * 40))
def test_the_floor_holds_under_normalizers_that_shorten_ascii(name, tiny_tokenizer_file, text):
    """It counted an ASCII text by its length under any normalizer: "a" and 20,000 spaces under Strip,
    GPT-2's vocabulary, had a floor of 157 tokens and one, so a row that fit was dropped as too long."""
    backend = Tokenizer.from_file(str(tiny_tokenizer_file))
    backend.normalizer = ALL[name]
    floor = LengthFloor(backend, 64)
    assert floor.tokens_at_least(text) <= len(backend.encode(text, add_special_tokens=False).ids)
    assert floor.shown_tokens_at_least(text) <= len(backend.encode(text, add_special_tokens=False).ids)


def test_a_tokenizer_that_panics_on_any_text_is_refused_when_loaded(tmp_path, tiny_tokenizer_file, capsys):
    """A charsmap with an empty trie panics in Rust on the first text it normalizes: prepare read every
    row, then stopped in one line blaming the tokenizer in general. Now it stops at the load, naming it."""
    from ds_sft.cli import main
    from tests.data.helpers import write_jsonl

    damaged = N.Precompiled(struct.pack("<I", 0) + b"x\0")
    path = tokenizer_file(tmp_path / "tok", damaged, tiny_tokenizer_file)
    with pytest.raises(UserError, match="fails on a plain sentence .*damaged"):
        load_tokenizer(path)
    write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "hi", "output": "yes"}] * 3)
    argv = ["prepare", "--source", f"s={tmp_path / 'rows.jsonl'}", "--tokenizer", path]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fails on a plain sentence" in last and path in last and not (tmp_path / "out").exists()


def test_a_tokenizer_with_an_ordinary_error_on_the_probe_still_loads(tmp_path):
    """A word-level vocabulary without an unknown token raises (an Exception) on words it lacks: its
    data may hold none of them, so the probe leaves it to the data."""
    from tokenizers import models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hi": 1}))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).eos_token == "<|endoftext|>"


# Normalizers whose match can span any length of text: a prefix of a text can normalize to more bytes
# than the whole ("a" and 10**5 x's: nothing matches; add the "b" and it all goes)
SPANNING = {
    "Replace, regex a[^b]*b": N.Replace(Regex("a[^b]*b"), ""),
    "Replace, regex in a sequence": N.Sequence([N.Lowercase(), N.Replace(Regex("<!--[\\s\\S]*-->"), "")]),
}


@pytest.mark.parametrize("name", SPANNING)
def test_the_floor_of_a_huge_text_holds_under_a_regex_that_spans_it(name, tiny_tokenizer_file):
    """The floor of a text past LengthFloor.prefix_chars was that of its prefix, assuming a prefix
    normalizes to no more bytes than the whole: a regex Replace breaks that without bound, and a row
    whose normalized text is empty was dropped as too long."""
    backend = Tokenizer.from_file(str(tiny_tokenizer_file))
    backend.normalizer = None
    past_a_prefix = LengthFloor(backend, 64).prefix_chars + 1000
    backend.normalizer = SPANNING[name]
    floor = LengthFloor(backend, 64)
    opening, closing = ("a", "b") if "a[^b]" in name else ("<!--", "-->")
    text = opening + "x" * past_a_prefix + closing
    assert backend.normalizer.normalize_str(text) == ""
    assert floor.tokens_at_least(text) == 0 == len(backend.encode(text, add_special_tokens=False).ids)
    assert length_change(json.loads(backend.normalizer.__getstate__())).prefix_bounded is False
    assert length_change(json.loads(ALL["Replace, shrinking"].__getstate__())).prefix_bounded is True
