"""load_tokenizer: every accepted form gives a fast tokenizer with an EOS, and the same ids."""

from __future__ import annotations

import pytest

from ds_sft.data.model_match import tokenizer_identity
from ds_sft.data.tokenizer import load_tokenizer
from ds_sft.errors import UserError


def test_tokenizer_json_without_roles_gets_its_eos(tiny_tokenizer_file):
    tokenizer = load_tokenizer(str(tiny_tokenizer_file))
    assert (
        tokenizer.eos_token == "<|endoftext|>"
        and tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    )


def test_saved_dir_and_data_dir_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(str(tmp_path / "data" / "tokenizer"))
    for spec in (tmp_path / "data" / "tokenizer", tmp_path / "data"):  # a prepared DATA dir works too
        again = load_tokenizer(str(spec))
        assert tokenizer_identity(again) == tokenizer_identity(tiny_tokenizer)
        assert again("Hello world")["input_ids"] == tiny_tokenizer("Hello world")["input_ids"]


def test_identity_survives_save_pretrained(shared, tmp_path):
    """GPT-2's own files lack EOS in added_tokens and its saved copy has it: the ids, and the hash, agree."""
    gpt2 = load_tokenizer("gpt2")
    gpt2.save_pretrained(str(tmp_path / "tokenizer"))
    again = load_tokenizer(str(tmp_path))
    assert tokenizer_identity(again) == tokenizer_identity(gpt2)
    text = "Hello <|endoftext|> world"
    assert again(text)["input_ids"] == gpt2(text)["input_ids"]


def test_identity_tells_tokenizers_of_one_vocab_size_apart(tiny_tokenizer, tmp_path):
    """Class 5's case: another tokenizer of the same size (two merges swapped) hashes differently."""
    import json

    spec = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    (tmp_path / "other.json").write_text(json.dumps(spec))
    other = load_tokenizer(str(tmp_path / "other.json"))
    assert len(other) == len(tiny_tokenizer)
    assert tokenizer_identity(other) != tokenizer_identity(tiny_tokenizer)


def test_gpt2_and_bare_weights_fall_back_to_gpt2(shared, tmp_path, capsys):
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.backend_tokenizer.encode("Hello world").ids == [15496, 995]
    (tmp_path / "base.pt").write_bytes(b"")
    assert load_tokenizer(str(tmp_path / "base.pt")).eos_token_id == 50256
    assert "using GPT-2's" in capsys.readouterr().out


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found: pass a tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope"))
