"""A row too long for ``--seq_len`` is found before it is tokenized (``LengthFloor``): dropped with
the same counted reason, or with ``--truncate`` cut first, and the documents are exactly those of
tokenizing every row whole and then fitting them to ``seq_len``.

The reference is the unbounded path itself (``tokenize_records`` without ``seq_len``), on generated
rows whose texts reach far past ``seq_len``: runs of one character, long words, unicode, whitespace.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_sft.data.tokenize import LengthFloor, bound_records, fit_to_length, tokenize_records
from tests.data.test_conversations import CHATML, with_template

# pieces texts are made of: ordinary words, long words and runs (a single pre-token), unicode, digits
PIECES = st.one_of(
    st.sampled_from(["the ", "capital ", "of ", "France ", "is ", "Paris. ", "\n", "\n\n", "  ", "#### 72"]),
    st.builds(lambda c, n: c * n, st.sampled_from("xa -=\n9é☃"), st.integers(1, 400)),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
)
texts = st.lists(PIECES, max_size=60).map(lambda parts: "".join(parts).strip())


@st.composite
def rows(draw, conversation: bool = False):
    history = []
    if conversation:
        for _ in range(draw(st.integers(1, 3))):
            history += [
                {"role": "user", "content": draw(texts) or "q"},
                {"role": "assistant", "content": draw(texts) or "a"},
            ]
    return {
        "id": "r",
        "source": "a",
        "instruction": draw(texts) or "i",
        "input": draw(texts),
        "response": draw(texts) or "r",
        "history": history,
    }


def same_documents(records, tokenizer, template, seq_len, truncate, train_on="all"):
    """The bounded path's fitted documents and drop reasons equal the unbounded path's, and so do
    those of the records ``bound_records`` keeps, which drops only records the unbounded path drops
    as too long (and none with ``truncate``)."""
    bounded = tokenize_records(records, tokenizer, template, {"a": 0}, train_on, seq_len, truncate)
    whole = tokenize_records(records, tokenizer, template, {"a": 0}, train_on)
    got, got_reasons = fit_to_length(bounded, seq_len, truncate)
    want, want_reasons = fit_to_length(whole, seq_len, truncate)
    assert_same(got, want)
    np.testing.assert_array_equal(got_reasons, want_reasons)
    kept, too_long = bound_records(records, tokenizer, template, train_on, seq_len, truncate)
    dropped = np.array([any(record is gone for gone in too_long) for record in records], dtype=bool)
    assert len(kept) == (~dropped).sum() and not (truncate and dropped.any())
    assert (want_reasons[dropped] == 1).all()
    early = tokenize_records(kept, tokenizer, template, {"a": 0}, train_on, seq_len, truncate)
    np.testing.assert_array_equal(early.full_lengths, bounded.full_lengths[~dropped])  # tokens_cut
    got, got_reasons = fit_to_length(early, seq_len, truncate)
    assert_same(got, want)
    np.testing.assert_array_equal(got_reasons, want_reasons[~dropped])
    return bounded, whole


def assert_same(got, want):
    for name in ("tokens", "offsets", "trained", "source_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("seq_len", [8, 40])
@given(records=st.lists(rows(), min_size=1, max_size=6))
def test_fitted_documents_equal_the_unbounded_path_alpaca(tiny_tokenizer, records, seq_len, truncate):
    same_documents(records, tiny_tokenizer, "alpaca", seq_len, truncate)


@pytest.fixture(scope="module")
def gpt2_chatml(shared):
    from ds_sft.data.tokenizer import load_tokenizer

    return with_template(load_tokenizer(str(shared / "tokenizers" / "gpt2")), CHATML)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("template", ["alpaca", "chat"])
@settings(max_examples=40)
@given(
    records=st.lists(rows(conversation=True), min_size=1, max_size=3),
    train_on=st.sampled_from(["all", "last"]),
)
def test_fitted_documents_equal_the_unbounded_path_gpt2_and_conversations(
    gpt2_chatml, records, template, truncate, train_on
):
    same_documents(records, gpt2_chatml, template, 8, truncate, train_on)


@pytest.mark.parametrize("truncate", [False, True])
def test_a_huge_row_is_not_tokenized_whole(tiny_tokenizer, monkeypatch, truncate):
    """A 2 MB row at seq_len 64: the encoder never sees more than a few thousand characters of it."""
    seen = []
    backend = tiny_tokenizer.backend_tokenizer
    encode = backend.encode_batch_fast

    def spy(texts, **kwargs):
        seen.extend(map(len, texts))
        return encode(texts, **kwargs)

    monkeypatch.setattr(type(backend), "encode_batch_fast", lambda self, texts, **kw: spy(texts, **kw))
    record = {"id": "r", "source": "a", "instruction": "What is it?", "input": "", "history": []}
    record["response"] = "Paris is the capital of France. " * 65_536
    docs = tokenize_records([record], tiny_tokenizer, "alpaca", {"a": 0}, "all", 64, truncate)
    floor = LengthFloor(backend, 64)
    assert max(seen) <= (2 * 64 + floor.MARGIN) * floor.longest
    kept, reasons = fit_to_length(docs, 64, truncate)
    assert reasons.tolist() == [0 if truncate else 1]
    assert len(kept) == truncate and (not truncate or kept.lengths.tolist() == [64])
    if not truncate:
        assert docs.full_lengths[0] >= len(record["response"]) // floor.longest


def sentencepiece_like() -> object:
    """A Llama-2-style BPE: spaces as "▁" by the normalizer, no pre-tokenizer, byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    from tests.data.conftest import CORPUS

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.train_from_iterator(
        CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    )
    state = json.loads(tokenizer.to_str())
    for byte in range(256):
        state["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(state["model"]["vocab"]))
    state["model"].update(byte_fallback=True, fuse_unk=True)
    return Tokenizer.from_str(json.dumps(state))


@pytest.fixture(scope="module")
def floor_tokenizers(tiny_tokenizer_file, shared):
    """Backends the floor holds for: byte-level BPE (tiny, GPT-2, and under NFC or NFKC as Qwen's), and
    a byte-fallback BPE."""
    from tokenizers import Tokenizer, normalizers

    tiny = str(tiny_tokenizer_file)
    nfc, nfkc = Tokenizer.from_file(tiny), Tokenizer.from_file(tiny)
    nfc.normalizer, nfkc.normalizer = normalizers.NFC(), normalizers.NFKC()
    gpt2 = Tokenizer.from_file(str(shared / "tokenizers" / "gpt2" / "tokenizer.json"))
    return [Tokenizer.from_file(tiny), nfc, nfkc, gpt2, sentencepiece_like()]


@settings(max_examples=200)
@given(text=st.one_of(texts, st.text(max_size=300)))
def test_floor_is_a_true_lower_bound(floor_tokenizers, text):
    for backend in floor_tokenizers:
        floor = LengthFloor(backend, 64)
        assert floor.longest is not None
        assert floor.tokens_at_least(text) <= len(backend.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("truncate", [False, True])
@settings(max_examples=60)
@given(records=st.lists(rows(), min_size=1, max_size=4), seq_len=st.sampled_from([4, 12]))
def test_fitted_documents_equal_the_unbounded_path_byte_fallback_bpe(
    floor_tokenizers, records, seq_len, truncate
):
    """A BPE without a pre-tokenizer merges across the whole text: the cut's margin holds there too."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=floor_tokenizers[4], eos_token="<unk>")
    same_documents(records, tokenizer, "alpaca", seq_len, truncate)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("which", [1, 2, 4])  # under NFC, NFKC, and the Llama-style Prepend + Replace
def test_a_huge_unicode_row_is_not_normalized_whole(floor_tokenizers, monkeypatch, which, truncate):
    """A 4 MB non-ASCII answer under a normalizer: the floor normalizes only a prefix of it (normalizing
    the whole takes ~20x its size), and the row is still dropped, or cut to the same tokens."""
    from transformers import PreTrainedTokenizerFast

    from ds_sft.data import tokenize
    from tests.data.conftest import EOS

    seen = []

    class Spied(LengthFloor):
        def __init__(self, backend, seq_len):
            super().__init__(backend, seq_len)
            normalize = self.normalize
            self.normalize = lambda text: seen.append(len(text)) or normalize(text)

    monkeypatch.setattr(tokenize, "LengthFloor", Spied)
    backend = floor_tokenizers[which]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<unk>" if which == 4 else EOS)
    record = {"id": "r", "source": "a", "instruction": "Wie ist Paris?", "input": "", "history": []}
    record["response"] = "Paris ist schön, café crème. " * 150_000
    docs = tokenize_records([record], tokenizer, "alpaca", {"a": 0}, "all", 64, truncate)
    kept, reasons = fit_to_length(docs, 64, truncate)
    assert reasons.tolist() == [0 if truncate else 1] and kept.lengths.tolist() == [64] * truncate
    assert max(seen) <= LengthFloor(backend, 64).prefix_chars < len(record["response"]) // 10
    seen.clear()
    early, too_long = bound_records([record], tokenizer, "alpaca", "all", 64, truncate)
    assert (too_long, len(early)) == (([], 1) if truncate else ([record], 0))
    assert max(seen) <= LengthFloor(backend, 64).prefix_chars


def test_floor_of_a_long_text_without_normalizer_counts_every_byte(floor_tokenizers):
    """Counted a slice at a time, the UTF-8 bytes of a long text are all of them."""
    text = "é☃ x\U0001f600" * 700_000
    for backend in (floor_tokenizers[0], floor_tokenizers[3]):
        floor = LengthFloor(backend, 64)
        assert floor.tokens_at_least(text) == -(-len(text.encode()) // floor.longest)


def test_floor_is_reached_on_gpt2(floor_tokenizers):
    """``L`` is not loose: GPT-2's longest token (128 characters, one byte each) repeated is one token
    a copy, exactly the floor."""
    backend = floor_tokenizers[3]
    floor = LengthFloor(backend, 64)
    longest = max(backend.get_vocab(), key=len)
    text = backend.decode([backend.token_to_id(longest)]) * 3
    assert floor.longest == len(longest) == 128
    assert floor.tokens_at_least(text) == len(backend.encode(text, add_special_tokens=False).ids) == 3


@pytest.mark.parametrize("truncate", [False, True])
@settings(
    max_examples=40,
    suppress_health_check=settings.default.suppress_health_check,
)
@given(
    which=st.integers(0, 4),
    fields=st.lists(
        st.tuples(st.sampled_from(["instruction", "input", "response"]), st.integers(-48, 3), texts),
        min_size=1,
        max_size=4,
    ),
    seq_len=st.sampled_from([64, 200]),
)
def test_rows_at_the_floor_equal_the_unbounded_path(floor_tokenizers, which, fields, seq_len, truncate):
    """Rows whose floor is within a few tokens of ``seq_len``, on either side: a text that fills it
    with the vocabulary's longest token repeated (each copy adds one token to the floor)."""
    from transformers import PreTrainedTokenizerFast

    from ds_sft.data.templates import render_prompt
    from tests.data.conftest import EOS

    backend = floor_tokenizers[which]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<unk>" if which == 4 else EOS)
    floor = LengthFloor(backend, seq_len)
    longest = max(backend.get_vocab(with_added_tokens=False), key=lambda token: len(token.encode()))
    unit = backend.decode([backend.token_to_id(longest)])
    records = []
    for field, d, tail in fields:
        record = {"id": "r", "source": "a", "instruction": "i", "input": "", "response": "r", "history": []}
        record[field] = tail or "x"
        pieces = [render_prompt(record, "alpaca"), record["response"]]
        least = sum(map(floor.tokens_at_least, pieces)) + 1
        record[field] = (unit * max(0, seq_len - least + d) + tail).strip() or "x"
        records.append(record)
    same_documents(records, tokenizer, "alpaca", seq_len, truncate)


def test_no_floor_for_a_tokenizer_with_unknown_tokens(tmp_path):
    """A WordPiece-style tokenizer maps a whole unknown word to one [UNK]: no bound holds, nothing is cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    floor = LengthFloor(tokenizer, 8)
    assert floor.longest is None
    record = {"instruction": "x" * 10_000, "input": "", "response": "y", "history": []}
    assert not floor.worth_checking(record)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("longest", [120, 1200])
@settings(
    max_examples=6,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), seq_len=st.sampled_from([80, 120, 300]))
def test_manifest_counts_rows_too_long_and_cut(tiny_tokenizer, run_prepare, data, seq_len, longest, truncate):
    """The manifest counts per source the rows dropped as too long, or with --truncate the rows cut and
    the tokens cut, as the full tokenization of every row says. Rows of up to 1,200 sentences reach
    past the floor: they leave (or are cut) before dedup, and the tokens cut of a row cut before it is
    tokenized are a floor; rows of up to 120 are tokenized whole, and counted exactly."""
    lengths = data.draw(st.lists(st.integers(1, longest), min_size=2, max_size=12))
    import tempfile
    from pathlib import Path

    from ds_sft.data.clean import Drops, clean_records
    from ds_sft.data.sources import SourceSpec, load_source
    from tests.data.helpers import alpaca_rows, write_jsonl

    rows = [
        dict(row, output=f"{i} " + "Paris is big. " * n)
        for i, (row, n) in enumerate(zip(alpaca_rows(len(lengths)), lengths, strict=True))
    ]
    rows.append({"instruction": "Hi?", "input": "", "output": "ok"})  # one row that fits
    with tempfile.TemporaryDirectory() as folder:
        data = write_jsonl(Path(folder) / "rows.jsonl", rows)
        flags = ["--alpaca", str(data), "--seq_len", str(seq_len), "--val_fraction", "0"]
        flags += ["--decontam_threshold", "0", "--output_dir", f"{folder}/out"] + ["--truncate"] * truncate
        manifest = run_prepare(flags)
        records, _ = load_source(SourceSpec("alpaca", "alpaca", str(data)), False, Drops())
    docs = tokenize_records(clean_records(records, Drops()), tiny_tokenizer, "alpaca", {"alpaca": 0})
    counts = manifest["counts"]["alpaca"]
    if not truncate:
        too_long = docs.lengths > seq_len
        assert counts["dropped"].get("longer_than_seq_len", 0) == int(too_long.sum())
        assert counts["kept"] == counts["train"] == int((~too_long).sum())
        return
    fits = docs.prompt_lens < seq_len
    cut = fits & (docs.lengths > seq_len)
    tokens_cut = int((docs.lengths[cut] - seq_len).sum())
    assert counts["truncated"]["rows"] == int(cut.sum())
    if longest == 120:
        assert counts["truncated"]["tokens_cut"] == tokens_cut
    else:  # a floor: at least one token of each row cut
        assert cut.sum() <= counts["truncated"]["tokens_cut"] <= tokens_cut
    assert counts["kept"] == int(fits.sum())


SHORT = st.sampled_from(["ok", "yes", "no way", "answer 7", "x" * 50, "é☃", "Paris is the capital."])


@st.composite
def long_conversations(draw):
    messages = []
    for _ in range(draw(st.integers(1, 40))):
        messages += [{"role": "user", "content": draw(SHORT)}, {"role": "assistant", "content": draw(SHORT)}]
    history = messages[:-2]
    return {"id": "c", "source": "a", "instruction": messages[-2]["content"], "input": "",
            "response": messages[-1]["content"], "history": history}  # fmt: skip


@pytest.fixture(scope="module")
def prefix_route_tokenizers(gpt2_chatml):
    """GPT-2 with each test chat template whose turns take the ``prefix`` route."""
    from tests.data.test_conversations import TEMPLATES

    return {name: with_template(gpt2_chatml, template) for name, template in TEMPLATES.items()}


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3", "default_system"])
@settings(max_examples=10)
@given(records=st.lists(long_conversations(), min_size=1, max_size=3), seq_len=st.sampled_from([24, 64, 200]))
def test_conversations_of_many_turns_equal_the_unbounded_path(
    prefix_route_tokenizers, records, template, seq_len, truncate
):
    tokenizer = prefix_route_tokenizers["chatml" if template == "alpaca" else template]
    same_documents(records, tokenizer, "alpaca" if template == "alpaca" else "chat", seq_len, truncate)


@pytest.mark.parametrize("truncate", [False, True])
def test_a_conversation_of_3000_turns_is_not_rendered_turn_by_turn(gpt2_chatml, monkeypatch, truncate):
    """The red team's conversation: 3,000 exchanges took 131 s (each turn renders its whole prefix).
    Dropped, it renders nothing; truncated, only the turns that start within seq_len."""
    from ds_sft.data import templates

    renders = []  # the conversation's renders (not the template's end-of-turn probe: 2 fixed messages)
    render = templates.render_messages
    monkeypatch.setattr(
        templates,
        "render_messages",
        lambda *args: (args[3] != "the end-of-turn probe" and renders.append(len(args[1]))) or render(*args),
    )
    turns = []
    for k in range(3000):
        turns += [
            {"role": "user", "content": f"question number {k}"},
            {"role": "assistant", "content": f"answer {k}"},
        ]
    record = {
        "id": "c",
        "source": "a",
        "instruction": "last?",
        "input": "",
        "response": "done",
        "history": turns,
    }
    docs = tokenize_records([record], gpt2_chatml, "chat", {"a": 0}, "all", 1024, truncate)
    kept, reasons = fit_to_length(docs, 1024, truncate)
    assert docs.full_lengths[0] >= 3001 * 2  # each answer has a token and an EOS
    if truncate:
        assert reasons.tolist() == [0] and kept.lengths.tolist() == [1024]
        assert len(renders) <= 2 * 1024 and max(renders) <= 1024
    else:
        assert not renders and reasons.tolist() == [1]
    # prepare judges it the same way before dedup: dropped, or kept cut to its first turns
    renders.clear()
    early, too_long = bound_records([record], gpt2_chatml, "chat", "all", 1024, truncate)
    assert (len(early), len(too_long)) == ((1, 0) if truncate else (0, 1))
    assert len(renders) <= 2 * 1024 and (truncate or not renders)
    if truncate:
        assert len(early[0]["history"]) <= 2 * 1024
        again = tokenize_records(early, gpt2_chatml, "chat", {"a": 0}, "all", 1024, truncate)
        assert_same(fit_to_length(again, 1024, truncate)[0], kept)


@pytest.mark.parametrize("truncate", [False, True])
def test_a_prompt_that_fills_seq_len_is_dropped_for_that(tiny_tokenizer, run_prepare, tmp_path, truncate):
    """Prompts of seq_len - 2 .. seq_len + 2 tokens, and one far past the floor: with --truncate a
    prompt that alone fills seq_len is dropped as ``prompt_fills_seq_len`` whichever path judged it;
    the floor's cut left its answer untokenized, and it was counted as ``answer_has_no_tokens``.
    Reference: each row's prompt and answer tokenized whole."""
    from ds_sft.data.templates import render_prompt
    from ds_sft.data.tokenize import first_text_ids
    from tests.data.helpers import write_jsonl

    seq_len, answer = 64, "Paris is big."

    def lengths(instruction: str) -> tuple[int, int]:
        row = {"instruction": instruction, "input": ""}
        (prompt,) = first_text_ids(tiny_tokenizer, [render_prompt(row, "alpaca")], "alpaca")
        return len(prompt), len(tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1

    instructions = {}
    for words in range(1, seq_len):
        instruction = " ".join(["Paris"] * words)
        prompt_len = lengths(instruction)[0]
        if abs(prompt_len - seq_len) <= 2:
            instructions.setdefault(prompt_len, instruction)
    instructions["floor"] = "Paris " * 20_000  # found too long from its text, before tokenizing
    assert len(instructions) >= 4
    flags = ["--seq_len", str(seq_len), "--val_fraction", "0", "--decontam_threshold", "0", "--no_pack"]
    fits = [{"instruction": "Hi?", "input": "", "output": "ok"}]  # so that some row is left to train
    flags += ["--source", f"fits={write_jsonl(tmp_path / 'fits.jsonl', fits)}"]
    for i, instruction in enumerate(instructions.values()):
        rows = [{"instruction": instruction, "input": "", "output": answer}]
        flags += ["--source", f"r{i}={write_jsonl(tmp_path / f'r{i}.jsonl', rows)}"]
    manifest = run_prepare([*flags, "--output_dir", str(tmp_path / "out")] + ["--truncate"] * truncate)
    for i, instruction in enumerate(instructions.values()):
        prompt_len, answer_len = lengths(instruction)
        if truncate:
            expected = {"prompt_fills_seq_len": 1} if prompt_len >= seq_len else {}
        else:
            expected = {"longer_than_seq_len": 1} if prompt_len + answer_len > seq_len else {}
        assert manifest["counts"][f"r{i}"]["dropped"] == expected, (prompt_len, truncate)
