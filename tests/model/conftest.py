"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def word_tokenizer():
    return make_word_tokenizer()


def make_word_tokenizer():
    """A six-word tokenizer (``<s>`` 1, ``</s>`` 2): export needs one, and every model fits it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
