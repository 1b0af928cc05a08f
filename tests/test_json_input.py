"""One reader for the JSON a user hands ds-sft (:mod:`ds_sft.json_input`), at every place it is read.

Each hostile file (a repeated key, NaN, Infinity, 1e400, an integer past ``int()``'s digits, nesting
past the limit or past the interpreter's recursion limit, a top level that is not an object, bytes
that are not UTF-8 or not JSON) is refused by each reader entry point in one line, or counted as
damage where the entry point has its own answer for an unreadable file; a valid file passes each.
Before the one reader, ``ds_sft.safe_read.read_json_object`` (model configs, data manifests, tokenizer
configs) kept the last of two keys, read NaN, and ended in a RecursionError traceback; the rows of a
data source, a GSM8K test file, a run's marker, lock and final listing, the demo's mark, a metrics line
and a bench result were each read by ``json.loads`` of their own, which kept repeated keys, NaN and lone
surrogates, and (the metrics line, the bench result) ended in a RecursionError traceback.
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
    "lone surrogate": (b'{"a": ["x\\ud800"]}', ['"a.0" holds', "surrogate"]),
    "lone surrogate in a key": (b'{"\\udc00": 1}', ['"\\udc00" holds', "surrogate"]),
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


# pieces of a JSON string around surrogate escapes: a high and a low half, an escaped backslash (after
# which "ud83d" is text), other escapes and text between them
STRING_PIECES = st.sampled_from(["\\ud83d", "\\uDC00", "\\\\", "ud83d", "\\n"])


@settings(derandomize=True, max_examples=1000)
@given(pieces=st.lists(STRING_PIECES, max_size=8), as_key=st.booleans())
def test_a_string_is_refused_exactly_when_it_holds_a_lone_surrogate(pieces, as_key):
    """Escaped pairs (an emoji) are read; half a pair, in a key or a value, is refused: the reader's
    quick look at the text never lets a lone one through, and never refuses a paired one."""
    string = '"' + "".join(pieces) + '"'
    text = f"{{{string}: 1}}" if as_key else f'{{"a": [{string}]}}'
    lone = any(0xD800 <= ord(char) <= 0xDFFF for char in json.loads(string))
    try:
        parse_json_object(text.encode())
    except JsonRefused as err:
        assert lone and err.reason == "lone_surrogate", (text, err)
    else:
        assert not lone, text


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


def jsonl_source(tmp_path, data):
    """A data source's JSON Lines file: a good row, then the file's bytes as line 2."""
    from ds_sft.data.clean import Drops
    from ds_sft.data.sources import read_table

    (tmp_path / "rows.jsonl").write_bytes(VALID["jsonl_source"] + b"\n" + data + b"\n")
    said = _refusal(lambda: read_table(tmp_path / "rows.jsonl", False, Drops(), "rows"))
    assert said is None or said.startswith(f"{tmp_path / 'rows.jsonl'}:2: "), said  # names the line
    return said


def json_array_source(tmp_path, data):
    """A data source's JSON array file: a good row, then the file's bytes as element 2."""
    from ds_sft.data.clean import Drops
    from ds_sft.data.sources import read_table

    (tmp_path / "rows.json").write_bytes(b"[" + VALID["json_array_source"] + b",\n" + data + b"]")
    return _refusal(lambda: read_table(tmp_path / "rows.json", False, Drops(), "rows"))


def gsm8k_test_file(tmp_path, data):
    """``--gsm8k_test``: a good problem, then the file's bytes as line 2."""
    from ds_sft.eval.gsm8k import load_test_set

    (tmp_path / "test.jsonl").write_bytes(VALID["gsm8k_test_file"] + b"\n" + data + b"\n")
    said = _refusal(lambda: load_test_set(tmp_path / "test.jsonl"))
    assert said is None or said.startswith(f"{tmp_path / 'test.jsonl'}:2: "), said
    return said


def metrics_line(tmp_path, data):
    from ds_sft.train.report import parse_record

    return None if parse_record(data.decode("utf-8", errors="replace")) is not None else "skipped"


def bench_result(tmp_path, data):
    from ds_sft.bench_result import written_by_a_bench

    (tmp_path / "result.json").write_bytes(data)
    return None if written_by_a_bench(tmp_path / "result.json") else "not a bench's"


def run_marker(tmp_path, data):
    from ds_sft.train.run_dir import MARKER, is_marked

    (tmp_path / MARKER).write_bytes(data)
    return None if is_marked(tmp_path) else "not marked"


def run_lock(tmp_path, data):
    from ds_sft.train.run_dir import LOCK_FILE, holder

    (tmp_path / LOCK_FILE).write_bytes(data)
    said = holder(tmp_path / LOCK_FILE)
    return None if said.startswith("pid 7 on ") else said


def final_listing(tmp_path, data):
    from ds_sft.train.run_dir import FINAL_LISTING, final_listing

    (tmp_path / FINAL_LISTING).write_bytes(data)
    return None if "listed.txt" in final_listing(tmp_path) else "the names of an older run's"


def demo_mark(tmp_path, data):
    from ds_sft.demo import DEMO_MARK, recorded_run

    (tmp_path / DEMO_MARK).write_bytes(data)
    return None if recorded_run(tmp_path / DEMO_MARK) == "the run" else "no run recorded"


ENTRY_POINTS = {
    f.__name__: f
    for f in (read_json_object, train_deepspeed_config, model_config, data_manifest, trainer_state,
              output_manifest, trained_on_record, jsonl_source, json_array_source, gsm8k_test_file,
              metrics_line, bench_result, run_marker, run_lock, final_listing, demo_mark)
}  # fmt: skip
# The entry points that quote the reader's words (the others have an answer of their own for a file
# they cannot read: damage, a skipped line, "not ours").
QUOTING = {"read_json_object", "train_deepspeed_config", "model_config", "data_manifest", "jsonl_source",
           "gsm8k_test_file"}  # fmt: skip
# ds-sft's own logs hold a NaN as json.dumps writes it (a skipped step's loss), and are decoded with
# errors="replace" (a line cut off mid-character keeps its other fields): their readers take both.
OWN_LOGS = {"metrics_line", "bench_result"}
OWN_LOGS_READ = {"NaN", "Infinity", "-Infinity", "1e400", "-1e400", "not UTF-8"}
# A line reader skips a blank line.
SKIPS_BLANK_LINES = {"jsonl_source", "gsm8k_test_file"}

# A file each entry point reads without objection (the object it expects, or one past the reader);
# a hostile object's keys are added to it (:func:`_inside`), so that only what the reader refuses is
# wrong with the file.
VALID = {
    "read_json_object": b'{"valid": 1}',
    "train_deepspeed_config": b'{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}',
    "model_config": json.dumps({"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2}).encode(),
    "data_manifest": b'{"sources": ["alpaca"]}',
    "trainer_state": b'{"step": 1}',  # malformed as a state, but read: not "corrupted"
    "output_manifest": b'{"files": {}}',
    "trained_on_record": b'{"template": "alpaca", "data_key": "k", "step": 1}',
    "jsonl_source": b'{"instruction": "Add 1 and 1.", "input": "", "output": "2"}',
    "json_array_source": b'{"instruction": "Add 1 and 1.", "input": "", "output": "2"}',
    "gsm8k_test_file": b'{"question": "1+1?", "answer": "#### 2"}',
    "metrics_line": b'{"type": "train", "step": 1, "loss": 2.5}',
    "bench_result": b'{"written_by": "ds-sft bench/x.py", "ratio": 1.5}',
    "run_marker": b'{"format": "ds-sft training run", "created": "today"}',
    "run_lock": b'{"pid": 7, "host": "h", "started": "today"}',
    "final_listing": b'{"files": ["listed.txt"]}',
    "demo_mark": b'{"format": "ds-sft demo", "run": "the run"}',
}


def _inside(valid: bytes, data: bytes) -> bytes:
    """``data``'s keys added to the ``valid`` object when ``data`` is an object, else ``data``."""
    return valid[:-1] + b", " + data[1:] if data.startswith(b"{") else data


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
    said = _call(entry, tmp_path, _inside(VALID[entry], data), capsys)
    if (entry in OWN_LOGS and case in OWN_LOGS_READ) or (entry in SKIPS_BLANK_LINES and case == "empty"):
        assert said is None, (entry, case, said)
        return
    assert said is not None, f"{entry} read the {case} file"
    assert "\n" not in said, said
    if entry in QUOTING:
        assert all(word in said for word in words), (entry, case, said)  # the reader's own words


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"empty"}))
def test_a_data_source_drops_each_hostile_row_by_its_reason(case, tmp_path):
    """With --skip_bad_rows a data source counts the hostile row under the reason the reader gives
    (``repeated_key``, ``non_finite_number``...) and keeps the good rows."""
    from ds_sft.data.clean import Drops
    from ds_sft.data.sources import read_table

    row = _inside(VALID["jsonl_source"], HOSTILE[case][0])
    with pytest.raises(JsonRefused) as refused:
        parse_json_object(row)
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join([VALID["jsonl_source"], row, VALID["jsonl_source"]]))
    drops = Drops()
    table = read_table(tmp_path / "rows.jsonl", True, drops, "rows")
    assert drops.by_source() == {"rows": {refused.value.reason: 1}}
    assert len(table["instruction"]) == 2
