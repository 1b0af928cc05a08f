"""load_tokenizer: every accepted form gives a fast tokenizer with an EOS, and the same ids."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


def tokenizer_folder(tiny_tokenizer_file, folder, slow: bool, config: dict):
    """The tiny tokenizer as a folder: its tokenizer.json, or the slow GPT-2 files (vocab.json,
    merges.txt) made from it; and ``config`` as its tokenizer_config.json."""
    if slow:
        model = json.loads(tiny_tokenizer_file.read_text())["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        config = {"tokenizer_class": "GPT2Tokenizer", **config}
    else:
        shutil.copy(tiny_tokenizer_file, folder / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@given(
    named=st.dictionaries(
        st.sampled_from(ROLES),
        st.one_of(
            st.sampled_from(["<|endoftext|>", "a", "Ġthe"]),
            st.from_regex(r"<\|no_such_[a-z]{1,6}\|>", fullmatch=True),
        ),
        min_size=1,
    ),
    extra=st.lists(st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), max_size=2, unique=True),
    slow=st.booleans(),
)
@settings(max_examples=30)
def test_special_tokens_outside_the_vocabulary_are_refused(
    tiny_tokenizer_file, tmp_path_factory, named, extra, slow
):
    """A tokenizer folder (tokenizer.json, or slow vocab.json + merges.txt) whose config names tokens
    for its roles (eos, bos, pad, unk; extra special tokens): accepted, with not one id added, when
    its vocabulary holds them all; otherwise one line naming each missing token (transformers used
    to add each as a new id, an EOS included)."""
    from tokenizers import Tokenizer

    config = {**named, "extra_special_tokens": extra}
    folder = tokenizer_folder(tiny_tokenizer_file, tmp_path_factory.mktemp("tok"), slow, config)
    vocab = Tokenizer.from_file(str(tiny_tokenizer_file)).get_vocab(with_added_tokens=True)
    outside = {role: token for role, token in named.items() if token not in vocab}
    outside.update({token: token for token in extra if token not in vocab})
    if not outside:
        tokenizer = load_tokenizer(str(folder))
        assert len(tokenizer) == len(vocab)
        assert all(getattr(tokenizer, role) == token for role, token in named.items())
        return
    with pytest.raises(UserError) as info:
        load_tokenizer(str(folder))
    message = str(info.value)
    assert "\n" not in message and "new id the model never saw" in message
    for role, token in outside.items():
        assert repr(token) in message and (role == token or f"{role} {token!r}" in message)


CONFIG_KEYS = (
    "eos_token", "pad_token", "tokenizer_class", "added_tokens_decoder", "additional_special_tokens",
    "extra_special_tokens", "model_input_names", "model_max_length", "padding_side", "chat_template",
    "clean_up_tokenization_spaces", "name_or_path",
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@given(
    config=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3),
    slow=st.booleans(),
)
@settings(max_examples=60, deadline=None)
@pytest.mark.filterwarnings("ignore")
def test_a_tokenizer_config_of_any_types_loads_or_is_one_line(
    tiny_tokenizer_file, tmp_path_factory, config, slow
):
    """Values of the wrong JSON type (an EOS that is a number, a decoder that is a list...) made
    transformers raise TypeError or AttributeError, which came out as a traceback."""
    folder = tokenizer_folder(tiny_tokenizer_file, tmp_path_factory.mktemp("tok"), slow, {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        tokenizer = load_tokenizer(str(folder))
    except UserError as err:
        assert "\n" not in str(err)
    else:
        assert tokenizer.eos_token_id is not None


@pytest.mark.parametrize(
    "config",
    [{"eos_token": 5}, {"tokenizer_class": 3}, {"added_tokens_decoder": [1, 2]}, {"model_input_names": 5},
     {"additional_special_tokens": [{"x": 1}]}],
    ids=["eos_int", "class_int", "decoder_list", "input_names_int", "additional_dicts"],
)  # fmt: skip
def test_an_unreadable_tokenizer_config_falls_back_to_the_tokenizer_json(
    tiny_tokenizer_file, tmp_path, capsys, config
):
    folder = tokenizer_folder(tiny_tokenizer_file, tmp_path, False, {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.eos_token_id is not None
    assert "transformers cannot read the tokenizer" in capsys.readouterr().out


ENCODE_SETTINGS = {
    "padding": {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                "pad_type_id": 0, "pad_token": "<|endoftext|>"},
    "truncation": {"direction": "Right", "max_length": 6, "strategy": "LongestFirst", "stride": 0},
}  # fmt: skip


@pytest.mark.parametrize("setting", ENCODE_SETTINGS)
def test_a_tokenizer_saved_with_padding_or_truncation_prepares_the_same_shards(
    tiny_tokenizer_file, tmp_path, monkeypatch, setting
):
    """tokenizers saves padding and truncation into tokenizer.json once enabled, and applied them to
    every encode: pad tokens were trained as answer text, prompts cut to a few tokens, silently."""
    import numpy as np

    import ds_sft.locations
    from ds_sft.data import prepare
    from tests.data.helpers import alpaca_rows, parse_prepare_args, write_jsonl

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    document = json.loads(tiny_tokenizer_file.read_text())
    document[setting] = ENCODE_SETTINGS[setting]
    saved = tmp_path / "tokenizer.json"
    saved.write_text(json.dumps(document))
    assert load_tokenizer(str(saved)).backend_tokenizer.padding is None
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(30))
    shards = {}
    for name, tokenizer in (("plain", tiny_tokenizer_file), ("saved", saved)):
        out = tmp_path / name
        prepare.run(parse_prepare_args(["--alpaca", str(data), "--tokenizer", str(tokenizer),
                                        "--output_dir", str(out), "--seq_len", "128"]))  # fmt: skip
        shards[name] = [
            np.load(out / "train" / f"shard_00000.{part}.npy") for part in ("tokens", "loss_mask")
        ]
    for plain, saved_part in zip(shards["plain"], shards["saved"], strict=True):
        assert np.array_equal(plain, saved_part)


@pytest.mark.parametrize("eos_id", [65_539, 3_000_000_000])
def test_a_sparse_vocabulary_is_stored_by_its_largest_id(tmp_path, monkeypatch, eos_id):
    """Shards took their dtype from the number of entries: 29 words with EOS at id 65,539 went into
    uint16, and every EOS and pad was stored as id 3 (a word), silently; an id past int32 was an
    OverflowError traceback."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    import ds_sft.locations
    from ds_sft.data import prepare
    from tests.data.helpers import alpaca_rows, parse_prepare_args, write_jsonl

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    rows = alpaca_rows(30)
    words = {w for row in rows for text in row.values() for w in text.replace(".", " . ").split()}
    prompt = "Below is an instruction that describes a task . Write a response appropriately completes"
    words |= {*prompt.split(), *["the", "request", "###", "Instruction", ":", "Response", "Input"]}
    vocab = {word: i for i, word in enumerate(["[UNK]", *sorted(words)])}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    saved = tmp_path / "tokenizer.json"
    backend.save(str(saved))
    document = json.loads(saved.read_text())  # the id set here: the library's own save takes a minute
    document["model"]["vocab"]["</s>"] = eos_id
    saved.write_text(json.dumps(document))
    argv = ["--alpaca", str(write_jsonl(tmp_path / "rows.jsonl", rows)), "--tokenizer", str(saved),
            "--output_dir", str(tmp_path / "out"), "--seq_len", "256",
            "--decontam_threshold", "0"]  # fmt: skip
    if eos_id > 2**31:
        with pytest.raises(UserError, match=r"has token id 3,000,000,000, past 2\*\*31 - 1"):
            prepare.run(parse_prepare_args(argv))
        return
    prepare.run(parse_prepare_args(argv))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == eos_id + 1
    tokens = np.load(tmp_path / "out" / "train" / "shard_00000.tokens.npy")
    length = int(np.load(tmp_path / "out" / "train" / "shard_00000.documents.npy")[0, 0])
    assert tokens.dtype == np.uint32 and tokens[0, length - 1] == eos_id


@pytest.mark.parametrize(
    ("name", "plain"),
    [("../../../escaped", False), ("tool/use", False), (".hidden", False), ("a\x00b", False), ("", False),
     ("default", True), ("tool_use", True), ("rag-v2.1", True)],
)  # fmt: skip
def test_a_chat_template_name_that_cannot_be_a_file_name_is_refused_at_load(tmp_path, name, plain):
    """transformers refused '../../../escaped' only when export (or eval --harness) saved the
    tokenizer, after the model had loaded, in a ValueError traceback. Plain names load and save."""
    from tests.model.conftest import make_word_tokenizer

    make_word_tokenizer().save_pretrained(tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "default", "template": "{{ messages }}"},
        {"name": name, "template": "x"},
    ]
    config_path.write_text(json.dumps(config))
    if not plain:
        with pytest.raises(UserError, match="is not a plain name"):
            load_tokenizer(str(tmp_path / "tok"))
        return
    load_tokenizer(str(tmp_path / "tok")).save_pretrained(tmp_path / "saved")  # transformers' own check
    assert (tmp_path / "saved" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    "named",
    [
        "RUN",
        "RUN/final",
        "RUN/final/model.safetensors",
        "RUN/final/tokenizer",
        "MODEL",
        "MODEL/model.safetensors",
        "PT/base.pt",
    ],  # fmt: skip
)
def test_a_model_is_read_with_the_tokenizer_stored_with_it(tiny_tokenizer, tmp_path, capsys, named):
    """A run folder, its final/ or its weights file, a model folder with its tokenizer files beside the
    weights, a .pt beside a tokenizer/ folder: the tokenizer stored there. A run's folder fell back to
    GPT-2 with a note (its tokenizer is in final/tokenizer/), and prepare wrote data no eval of that run
    could read."""
    for folder in ("RUN/final", "MODEL", "PT"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "RUN/checkpoints").mkdir()
    for weights in ("RUN/final/model.safetensors", "MODEL/model.safetensors", "PT/base.pt"):
        (tmp_path / weights).write_bytes(b"")
    tiny_tokenizer.save_pretrained(str(tmp_path / "RUN/final/tokenizer"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "MODEL"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "PT/tokenizer"))
    loaded = load_tokenizer(str(tmp_path / named))
    assert tokenizer_identity(loaded) == tokenizer_identity(tiny_tokenizer)
    assert "GPT-2" not in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["unfinished run", "empty folder", "only a report"])
def test_a_folder_without_tokenizer_or_weights_is_refused_not_read_as_gpt2(tmp_path, capsys, layout):
    """A run that has not finished (no final/ yet) has neither: GPT-2 was a guess, said in a note only."""
    folder = tmp_path / "run"
    folder.mkdir()
    if layout == "unfinished run":
        (folder / "checkpoints" / "step_000002").mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("{}\n")
    elif layout == "only a report":
        (folder / "report.md").write_text("# a report\n")
    with pytest.raises(UserError, match="holds no tokenizer and no model weights"):
        load_tokenizer(str(folder))
    assert "GPT-2" not in capsys.readouterr().out


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model_config.json"])
def test_a_weights_folder_without_a_tokenizer_is_read_with_gpt2_as_bare_weights_are(
    shared, tmp_path, capsys, weights
):
    (tmp_path / weights).write_bytes(b"")
    assert load_tokenizer(str(tmp_path)).eos_token_id == 50256
    assert "using GPT-2's" in capsys.readouterr().out
