"""Loss masks by construction: decoding the trained tokens gives back exactly the response + EOS."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest

from ds_sft.data.templates import ALPACA_PROMPT, answer_ids, render_prompt, resolve_template
from ds_sft.data.tokenize import (
    AlpacaPrompts,
    first_text_ids,
    fit_to_length,
    splits_cleanly_at_newlines,
    tokenize_records,
)
from ds_sft.data.tokenizer import load_tokenizer, start_ids
from ds_sft.errors import UserError


def make_record(instruction, response, extra="", source="a"):
    return {"id": "x", "source": source, "category": "general", "instruction": instruction, "input": extra,
            "response": response, "history": []}  # fmt: skip


def check_masks(docs, records, tokenizer):
    mask = docs.loss_mask().astype(bool)
    for i, rec in enumerate(records):
        span = slice(docs.offsets[i], docs.offsets[i + 1])
        ids, trained = docs.tokens[span], mask[span]
        assert trained[-1] and ids[-1] == tokenizer.eos_token_id  # EOS is always trained
        assert tokenizer.decode(ids[trained][:-1].tolist()) == rec["response"]
        assert not trained[: docs.prompt_lens[i]].any() and trained[docs.prompt_lens[i] :].all()


def test_mask_is_exactly_response_plus_eos_tiny(tiny_tokenizer):
    records = [make_record("Say hi", "Hi there!"), make_record("Add", "2 + 2 = 4\n#### 4", extra="2 and 2")]
    docs = tokenize_records(records, tiny_tokenizer, "alpaca", {"a": 0})
    check_masks(docs, records, tiny_tokenizer)
    prompt = tiny_tokenizer.decode(docs.tokens[: docs.prompt_lens[0]].tolist())
    assert prompt == render_prompt(records[0], "alpaca")


def test_mask_on_real_rows_with_gpt2_where_pad_is_eos(shared):
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.eos_token_id == 50256
    rows = json.loads((shared / "data/alpaca/alpaca_cleaned_first5k.json").read_text())[:300]
    records = [make_record(r["instruction"], r["output"], r["input"]) for r in rows]
    docs = tokenize_records(records, tokenizer, "alpaca", {"a": 0})
    check_masks(docs, records, tokenizer)
    # tokenizing apart gives the same ids as tokenizing the joined text (no boundary artifacts here)
    joined = tokenizer.backend_tokenizer.encode(
        render_prompt(records[3], "alpaca") + records[3]["response"]
    ).ids
    assert docs.tokens[docs.offsets[3] : docs.offsets[4] - 1].tolist() == joined


def test_chat_template_of_smollm2_gguf(smollm2_gguf):
    tokenizer = load_tokenizer(str(smollm2_gguf))
    assert resolve_template("auto", tokenizer) == "chat"
    records = [make_record("What is the capital of France?", "The capital of France is Paris.")]
    prompt = render_prompt(records[0], "chat", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt
    docs = tokenize_records(records, tokenizer, "chat", {"a": 0})
    check_masks(docs, records, tokenizer)
    assert tokenizer.convert_ids_to_tokens(int(docs.tokens[-1])) == "<|im_end|>"


def test_template_resolution(tiny_tokenizer):
    assert resolve_template("auto", tiny_tokenizer) == "alpaca"
    with pytest.raises(UserError, match="no chat template"):
        resolve_template("chat", tiny_tokenizer)
    assert render_prompt({"instruction": "Q", "input": "C"}, "alpaca") == ALPACA_PROMPT.format(
        instruction="Q", input="C"
    )


def test_too_long_dropped_or_truncated(tiny_tokenizer):
    records = [make_record("Hi", "short"), make_record("Hi", "long " * 80), make_record("x " * 200, "y")]
    docs = tokenize_records(records, tiny_tokenizer, "alpaca", {"a": 0})
    seq_len = int(docs.lengths[0]) + 10
    kept, reasons = fit_to_length(docs, seq_len, truncate=False)
    assert reasons.tolist() == [0, 1, 1] and len(kept) == 1
    kept, reasons = fit_to_length(docs, seq_len, truncate=True)
    assert reasons.tolist() == [0, 0, 2]
    assert kept.lengths.tolist() == [docs.lengths[0], seq_len]
    np.testing.assert_array_equal(kept.tokens[kept.offsets[1] :], docs.tokens[docs.offsets[1] :][:seq_len])


def test_answer_ids_are_the_trained_tokens(tiny_tokenizer):
    """The answer convention eval relies on: response ids then EOS, exactly what training masks in."""
    record = make_record("Say hi", "Hi there!\n#### 4")
    docs = tokenize_records([record], tiny_tokenizer, "alpaca", {"a": 0})
    assert docs.tokens[docs.prompt_lens[0] :].tolist() == answer_ids(tiny_tokenizer, record["response"])


def test_spliced_alpaca_prompts_equal_whole_prompt_tokenization(shared):
    """GPT-2's template text is tokenized once and spliced around the fields: same ids, every row."""
    from ds_sft.data.clean import Drops, clean_records
    from ds_sft.data.sources import SourceSpec, load_source

    tokenizer = load_tokenizer("gpt2")
    backend = tokenizer.backend_tokenizer
    assert splits_cleanly_at_newlines(backend)
    records = []
    for name, rel in [
        ("alpaca", "alpaca/alpaca_cleaned_first5k.json"),
        ("dolly", "dolly/dolly_5k_instruction_input_output.jsonl"),
    ]:
        loaded, _ = load_source(SourceSpec(name, name, str(shared / "data" / rel)), False, Drops())
        records += clean_records(loaded, Drops())[:1500]
    splice = AlpacaPrompts(records, backend, start_ids(tokenizer))
    spliced = splice.assemble([e.ids for e in backend.encode_batch(splice.fields, add_special_tokens=False)])
    whole = first_text_ids(tokenizer, [render_prompt(r, "alpaca") for r in records], "alpaca")
    assert spliced == whole


def sentencepiece_style_tokenizer(folder, legacy: bool):
    """A BPE that marks a text's start with "▁", as SentencePiece tokenizers do:
    by a Metaspace pre-tokenizer (prepend_scheme "first", tokenizers' LLaMA/Mistral conversion) or,
    ``legacy``, by a Prepend normalizer (transformers' legacy LLaMA-2/TinyLlama tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if legacy:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    alphabet = [*string.printable, "▁"]  # every character the tests write
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    words = "Below is an instruction that describes a task Hello world Paris answer the question again"
    tokenizer.train_from_iterator([words] * 50, trainer=trainer)
    path = folder / ("legacy.json" if legacy else "metaspace.json")
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


@pytest.mark.parametrize("legacy", [False, True])
def test_pieces_after_the_first_carry_no_start_of_text_mark(tmp_path, legacy):
    """Answers and later turns are tokenized apart; a SentencePiece-style tokenizer marks the start of
    each text with "▁", so every answer began with a space the document does not hold: the decoded
    document read "### Response:\\n Hello", and the model was trained to open each answer with it.
    Reference: the template applied by hand, the document decoded whole."""
    from ds_sft.data.templates import ALPACA_NEXT_TURN, ALPACA_PREAMBLE, ALPACA_PROMPT_NO_INPUT

    tokenizer = sentencepiece_style_tokenizer(tmp_path, legacy)
    eos = tokenizer.eos_token
    chat = {
        **make_record("Answer again", "Paris world"),
        "history": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello world"}],
    }
    records = [make_record("Answer the question", "Hello world"), chat]
    expected = [
        ALPACA_PROMPT_NO_INPUT.format(instruction="Answer the question") + "Hello world" + eos,
        ALPACA_PREAMBLE
        + "### Instruction:\nHello\n\n### Response:\nHello world"
        + eos
        + ALPACA_NEXT_TURN.format(instruction="Answer again")
        + "Paris world"
        + eos,
    ]
    docs = tokenize_records(records, tokenizer, "alpaca", {"a": 0})
    for i, text in enumerate(expected):
        ids = docs.tokens[docs.offsets[i] : docs.offsets[i + 1]].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=False).removeprefix("<s>").lstrip() == text


# Post-processor layouts (tokenizers' TemplateProcessing): (single, pair, tokens it puts before a text).
LAYOUTS = {
    "none": (None, None, []),
    "bos": ("<s> $A", None, ["<s>"]),
    "bos_eos": ("<s> $A </s>", None, ["<s>"]),
    "suffix": ("$A </s>", None, []),
    "template_with_pair": ("<s> $A </s>", "<s> $A </s> $B:1 </s>:1", ["<s>"]),
}


def layout_tokenizer(folder, single, pair, normalized: bool):
    """A byte-level BPE with the post-processor ``single``/``pair``; ``normalized`` gives it an NFC
    normalizer, which takes it off the spliced Alpaca path (splits_cleanly_at_newlines)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from tests.data.conftest import CORPUS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if normalized:
        tokenizer.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    if single is not None:
        specials = [(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>")]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


@pytest.mark.parametrize("normalized", [False, True], ids=["spliced", "whole"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_alpaca_prompts_take_only_what_the_post_processor_prepends(tmp_path, layout, normalized):
    """An Alpaca prompt starts with what the post-processor puts before a text (a BOS) and never holds
    what it puts after (an EOS): encoded with special tokens, every prompt carried an EOS before its
    answer, and on the spliced path BOS + EOS were taken as the "BOS" and a traceback followed.
    Training documents and eval's prompts agree. Reference: the layout's own leading tokens, then
    the text encoded without special tokens."""
    from pathlib import Path

    from ds_sft.eval.evaluate import EvalData

    single, pair, before = LAYOUTS[layout]
    tokenizer = layout_tokenizer(tmp_path, single, pair, normalized)
    backend = tokenizer.backend_tokenizer
    start = [tokenizer.convert_tokens_to_ids(token) for token in before]
    chat = {
        **make_record("Give three tips", "Eat well."),
        "history": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Paris"}],
    }
    records = [make_record("Say hi", "Hi there!"), make_record("Add", "#### 4", extra="2 and 2"), chat]
    docs = tokenize_records(records, tokenizer, "alpaca", {"a": 0})
    eval_data = EvalData(Path(tmp_path), "alpaca", tokenizer, None)
    for i, record in enumerate(records):
        ids = docs.tokens[docs.offsets[i] : docs.offsets[i + 1]].tolist()
        assert ids[: len(start)] == start
        eos = tokenizer.eos_token
        text = tokenizer.decode(ids[len(start) :], skip_special_tokens=False)
        if record["history"]:  # the transcript; its texts are tokenized apart, so compare text
            assert text.count(eos) == 2 and text.endswith("Eat well." + eos)
            continue
        prompt = render_prompt(record, "alpaca")
        plain = backend.encode(prompt + record["response"], add_special_tokens=False).ids
        assert ids == start + plain + [tokenizer.eos_token_id]
        assert docs.prompt_lens[i] == len(start) + len(backend.encode(prompt, add_special_tokens=False).ids)
        assert eval_data.prompt_ids(record) == ids[: docs.prompt_lens[i]]


@pytest.mark.parametrize("single", ["<s>", "$A </s> $A"], ids=["no_text", "text_twice"])
def test_a_post_processor_that_splits_the_text_is_refused_in_one_line(tmp_path, single):
    """A layout whose leading tokens cannot be told apart from the text is refused, naming the fix."""
    tokenizer = layout_tokenizer(tmp_path, single, None, False)
    with pytest.raises(UserError, match="post_processor") as err:
        tokenize_records([make_record("Say hi", "Hi there!")], tokenizer, "alpaca", {"a": 0})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("normalized", [False, True], ids=["spliced", "whole"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_alpaca_chat_template_renders_the_documents_alpaca_training_made(tmp_path, layout, normalized):
    """``export`` gives an Alpaca-tuned model this chat template: transformers' apply_chat_template of
    a conversation is, token for token, the document prepare made of it (system turn, two exchanges,
    EOS after each answer), and a question with the generation prompt is the prompt prepare trains and
    eval asks with; whatever the tokenizer's post-processor puts first (a BOS) is the template's start."""
    from ds_sft.data.templates import alpaca_chat_template
    from ds_sft.data.tokenizer import start_ids

    single, pair, _ = LAYOUTS[layout]
    tokenizer = layout_tokenizer(tmp_path, single, pair, normalized)
    tokenizer.chat_template = alpaca_chat_template(tokenizer.decode(start_ids(tokenizer)))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Give three tips"},
        {"role": "assistant", "content": "Eat well."},
    ]
    conversation = {**make_record("Give three tips", "Eat well."), "history": messages[:3]}
    question = make_record("Say hi", "Hi there!")
    docs = tokenize_records([conversation, question], tokenizer, "alpaca", {"a": 0})
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert rendered == docs.tokens[docs.offsets[0] : docs.offsets[1]].tolist()
    asked = [{"role": "user", "content": question["instruction"]}]
    prompt = tokenizer.apply_chat_template(asked, add_generation_prompt=True, return_dict=False)
    assert prompt == docs.tokens[docs.offsets[1] : docs.offsets[1] + docs.prompt_lens[1]].tolist()
