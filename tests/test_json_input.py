"""One reader for the JSON a user hands ds-sft (:mod:`ds_sft.json_input`), at every place it is read.

Each hostile file (a repeated key, NaN, Infinity, 1e400, an integer past ``int()``'s digits, nesting
past the limit or past the interpreter's recursion limit, a top level that is not an object, bytes
that are not UTF-8 or not JSON) is refused by each reader entry point in one line, or counted as
damage where the entry point has its own answer for an unreadable file; a valid file passes each.
Before the one reader, ``ds_sft.safe_read.read_json_object`` (model configs, data manifests, tokenizer
configs) kept the last of two keys, read NaN, and ended in a RecursionError traceback.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.json_input import MAX_DEPTH, JsonRefused, parse_json_object

# name -> (file bytes, words the refusal must say)
HOSTILE = {
    "repeated key": (b'{"a": 1, "a": 2}', ['"a" twice']),
    "repeated nested key": (b'{"a": {"b": [{"c": 1, "c": 1}]}}', ['"a.b.0.c" twice']),
    "NaN": (b'{"a": {"b": NaN}}', ['"a.b" is NaN', "not a finite number"]),
    "Infinity": (b'{"a": [1, Infinity]}', ['"a.1" is Infinity', "not a finite number"]),
    "-Infinity": (b'{"a": -Infinity}', ['"a" is -Infinity']),
    "1e400": (b'{"a": 1e400}', ['"a" is 1e400', "not a finite number"]),
    "-1e400": (b'{"a": -1e400}', ['"a" is -1e400']),
    "5,000-digit integer": (b'{"a": ' + b"9" * 5000 + b"}", ['"a"', "5,000 digits"]),
    "nested past the limit": (b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), ["nested more"]),
    "nested past the recursion limit": (b"[" * 100_000 + b"]" * 100_000, ["nested more"]),
    "an array": (b"[1, 2]", ["holds a JSON list"]),
    "a string": (b'"config"', ["holds a JSON string"]),
    "a number": (b"3", ["holds a JSON number"]),
    "null": (b"null", ["holds JSON null"]),
    "top-level NaN": (b"NaN", ["the top level is NaN"]),
    "not UTF-8": (b'{"a": "caf\xe9"}', ["not UTF-8"]),
    "not JSON": (b"{'a': 1}", ["not valid JSON"]),
    "truncated": (b'{"a": [1, 2', ["not valid JSON"]),
    "empty": (b"", ["not valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_text_is_refused_in_one_line_saying_what(case):
    data, words = HOSTILE[case]
    with pytest.raises(JsonRefused) as refused:
        parse_json_object(data)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), (case, message)


def test_nesting_up_to_the_limit_is_read():
    depth = MAX_DEPTH  # containers, the top-level object included
    objects = '{"a": ' * depth + "1" + "}" * depth
    arrays = '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    for text in (objects, arrays):
        assert parse_json_object(text) == json.loads(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, max_examples=300)
@given(tree=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5))
def test_every_valid_object_reads_as_pythons_reader_reads_it(tree):
    """On what it accepts the reader is Python's: same values, same types, same key order."""
    text = json.dumps(tree)
    assert repr(parse_json_object(text)) == repr(json.loads(text))
    assert repr(parse_json_object(text.encode())) == repr(json.loads(text))


# --- every place ds-sft reads a user's JSON ---------------------------------------------------------
# Each entry point: (tmp folder, file bytes) -> what it said when it refused (a string), or None when it
# read the file. Where the file goes is the entry point's: a DeepSpeed config, a model config, a data
# dir's manifest, a checkpoint tag's trainer_state.json, an output folder's manifest, a run's record.


def _refusal(call) -> str | None:
    try:
        call()
    except UserError as err:
        return str(err)
    return None


def read_json_object(tmp_path, data):
    from ds_sft.safe_read import read_json_object

    (tmp_path / "any.json").write_bytes(data)
    return _refusal(lambda: read_json_object(tmp_path / "any.json"))


def train_deepspeed_config(tmp_path, data, capsys=None):
    from ds_sft.cli import main

    (tmp_path / "ds.json").write_bytes(data)
    argv = ["train", "--deepspeed_config", str(tmp_path / "ds.json"), "--model", "tiny"]
    try:
        main([*argv, "--data_dir", str(tmp_path / "no-data")])
    except SystemExit as stop:
        assert stop.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1, said
    return None if "no-data" in said[0] else said[0]  # a valid config gets as far as the data dir


def model_config(tmp_path, data):
    from ds_sft.model.config import ModelConfig

    (tmp_path / "model_config.json").write_bytes(data)
    return _refusal(lambda: ModelConfig.load(tmp_path / "model_config.json"))


def data_manifest(tmp_path, data):
    from ds_sft.data.shards import read_manifest

    (tmp_path / "manifest.json").write_bytes(data)
    return _refusal(lambda: read_manifest(tmp_path))


def trainer_state(tmp_path, data):
    from ds_sft.run_layout import TRAINER_STATE
    from ds_sft.train.checkpoint_check import damage

    (tmp_path / TRAINER_STATE).write_bytes(data)
    found = damage(tmp_path)
    # torn bytes are "corrupted"; JSON holding what a state cannot (NaN, a repeat, a list) "malformed"
    return found if found and ("is corrupted" in found or "is malformed JSON" in found) else None


def output_manifest(tmp_path, data):
    from ds_sft.written_files import read_listing

    (tmp_path / "manifest.json").write_bytes(data)
    return None if read_listing(tmp_path, "manifest.json") is not None else "unreadable"


def trained_on_record(tmp_path, data):
    from ds_sft.data.model_match import TRAINED_ON, trained_record

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / TRAINED_ON).write_bytes(data)
    return _refusal(lambda: trained_record(str(tmp_path)))


ENTRY_POINTS = {
    f.__name__: f
    for f in (read_json_object, train_deepspeed_config, model_config, data_manifest, trainer_state,
              output_manifest, trained_on_record)
}  # fmt: skip

# A file each entry point reads without objection (the object it expects, or one past the reader).
VALID = {
    "read_json_object": b'{"a": 1}',
    "train_deepspeed_config": b'{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}',
    "model_config": json.dumps({"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2}).encode(),
    "data_manifest": b'{"sources": ["alpaca"]}',
    "trainer_state": b'{"step": 1}',  # malformed as a state, but read: not "corrupted"
    "output_manifest": b'{"files": {}}',
    "trained_on_record": b'{"template": "alpaca", "data_key": "k", "step": 1}',
}


def _call(name, tmp_path, data, capsys):
    entry = ENTRY_POINTS[name]
    return entry(tmp_path, data, capsys) if name == "train_deepspeed_config" else entry(tmp_path, data)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_each_entry_point_reads_a_valid_file(entry, tmp_path, capsys):
    assert _call(entry, tmp_path, VALID[entry], capsys) is None


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_each_entry_point_refuses_each_hostile_file_in_one_line(entry, case, tmp_path, capsys):
    data, words = HOSTILE[case]
    said = _call(entry, tmp_path, data, capsys)
    assert said is not None, f"{entry} read the {case} file"
    assert "\n" not in said, said
    if entry in ("read_json_object", "train_deepspeed_config", "model_config", "data_manifest"):
        assert all(word in said for word in words), (entry, case, said)  # the reader's own words
