"""A GGUF's tokenizer carries the special tokens its metadata names, whatever transformers' converter
guessed (5.17's llama converter swaps BOS and EOS: transformers/integrations/ggml.py there sets
``eos_token = bos_token``). The files come from :func:`tests.gguf_files.write_gguf`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_sft.data import tokenizer as tokenizer_module
from ds_sft.data.model_match import gguf_identity, tokenizer_identity
from ds_sft.data.tokenizer import load_tokenizer
from ds_sft.errors import UserError
from tests.gguf_files import SPECIAL, TOKENS, write_gguf

ROLES = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}


def roles_of(tokenizer, ids):
    return {role: getattr(tokenizer, ROLES[role]) for role in ids}


special_ids = st.integers(0, SPECIAL - 1)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(ids=st.fixed_dictionaries({"bos": special_ids, "eos": special_ids}, optional={"pad": special_ids}))
def test_special_tokens_are_the_ones_the_metadata_names(tmp_path, ids):
    path = write_gguf(tmp_path / "model.gguf", ids)
    tokenizer = load_tokenizer(str(path))
    assert roles_of(tokenizer, ids) == {role: TOKENS[token_id] for role, token_id in ids.items()}
    assert tokenizer_identity(tokenizer) == gguf_identity(path)


def test_a_converter_that_swaps_bos_and_eos_is_overruled(tmp_path, monkeypatch):
    """What transformers 5.17 does to every llama GGUF, e.g. SmolLM2's (BOS <|im_start|>, EOS <|im_end|>)."""
    load_from_pretrained = tokenizer_module._from_pretrained

    def swapping(directory, **kwargs):
        tokenizer = load_from_pretrained(directory, **kwargs)
        tokenizer.bos_token, tokenizer.eos_token = tokenizer.eos_token, tokenizer.bos_token
        return tokenizer

    monkeypatch.setattr(tokenizer_module, "_from_pretrained", swapping)
    path = write_gguf(tmp_path / "model.gguf", {"bos": 1, "eos": 2})
    assert swapping(tmp_path, gguf_file=path.name).eos_token == "<|im_start|>"  # the converter's guess
    tokenizer = load_tokenizer(str(path))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2


@pytest.mark.parametrize("role", ["bos", "eos", "pad"])
@pytest.mark.parametrize("token_id", [len(TOKENS), len(TOKENS) + 7, 2**31 - 1])
def test_a_special_token_id_outside_the_vocabulary_is_one_line(tmp_path, role, token_id):
    ids = {"bos": 1, "eos": 2, role: token_id}
    path = write_gguf(tmp_path / "model.gguf", ids)
    expected = rf"names token id {token_id} as {ROLES[role]}, but the vocabulary has {len(TOKENS)} tokens"
    with pytest.raises(UserError, match=expected):
        load_tokenizer(str(path))


def test_a_gguf_without_a_tokenizer_is_one_line(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(str(write_gguf(tmp_path / "weights.gguf")))


@pytest.mark.parametrize("kept", [0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, "all but 40 bytes"])
def test_a_truncated_gguf_is_one_line(tmp_path, kept):
    data = write_gguf(tmp_path / "whole.gguf", {"bos": 1, "eos": 2}).read_bytes()
    path = tmp_path / "cut.gguf"
    # The metadata ends in up to 31 bytes of alignment padding: 40 bytes off always cut into it.
    path.write_bytes(data[: len(data) - 40] if isinstance(kept, str) else data[: int(len(data) * kept)])
    with pytest.raises(UserError, match=r"cut\.gguf"):
        load_tokenizer(str(path))


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"this": "is json"}\n' * 50)
    with pytest.raises(UserError, match="not a readable GGUF file, truncated or corrupt"):
        load_tokenizer(str(path))


def test_one_parse_per_file_version(tmp_path, monkeypatch):
    """The tokenizer and its identity share one parse of the file; a file rewritten in place (a new
    version at the same path) is parsed again, and its new ids are the ones used. (transformers
    parses the file again inside its own tokenizer load: those parses count here too.)"""
    import gguf

    parses = []
    parse = gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):  # every parse, ds-sft's bounded subclass's included
        parses.append(path)
        return parse(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    path = write_gguf(tmp_path / "model.gguf", {"bos": 1, "eos": 2})
    assert load_tokenizer(str(path)).eos_token == "<|im_end|>"
    after_load = len(parses)
    gguf_identity(path)
    assert len(parses) == after_load
    write_gguf(path, {"bos": 1, "eos": 0})
    gguf_identity(path)
    assert len(parses) == after_load + 1
    assert load_tokenizer(str(path)).eos_token == "<|endoftext|>"
