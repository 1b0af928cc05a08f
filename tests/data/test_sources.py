"""Sources: each schema maps to the normalized record; each bad input is a clear error or a counted drop."""

from __future__ import annotations

import json

import pytest

from ds_sft.data.clean import Drops
from ds_sft.data.sources import SourceSpec, load_source, parse_field_map
from ds_sft.errors import UserError
from tests.data.helpers import alpaca_rows, write_jsonl


def load(tmp_path, name, kind, rows=None, filename="rows.jsonl", text=None, skip=False, field_map=None):
    path = tmp_path / filename
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    else:
        write_jsonl(path, rows)
    drops = Drops()
    records, info = load_source(SourceSpec(name, kind, str(path), field_map or {}), skip, drops)
    return records, info, drops


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows(3)))
    records, info = load_source(SourceSpec("alpaca", "alpaca", str(path)), False, Drops())
    assert info["rows"] == 3 and len(info["sha256"]) == 64
    first = records[0]
    assert first == {
        "id": "alpaca:0",
        "source": "alpaca",
        "category": "general",
        "instruction": "Describe item number 0 in one sentence.",
        "input": "Item 0 is red and weighs 0 grams.",
        "response": "Item 0 is a small red object of 0 grams, used as example 0.",
        "history": [],
    }


def test_gsm8k_parquet_gets_math_category(tmp_path):
    import datasets

    path = tmp_path / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list([{"question": "1+1?", "answer": "1+1=2\n#### 2"}]).to_parquet(str(path))
    records, _ = load_source(SourceSpec("gsm8k", "gsm8k", str(path)), False, Drops())
    assert records[0]["instruction"] == "1+1?" and records[0]["category"] == "math"
    assert records[0]["response"] == "1+1=2\n#### 2"


def test_dolly_both_schemas(tmp_path):
    own = [{"instruction": "Q", "context": "C", "response": "R", "category": "closed_qa"}]
    renamed = [{"instruction": "Q", "input": "C", "output": "R"}]
    a, _, _ = load(tmp_path, "dolly", "dolly", own, "own.jsonl")
    b, _, _ = load(tmp_path, "dolly", "dolly", renamed, "renamed.jsonl")
    assert (a[0]["input"], a[0]["response"], a[0]["category"]) == ("C", "R", "closed_qa")
    assert (b[0]["input"], b[0]["response"], b[0]["category"]) == ("C", "R", "general")


def test_real_dolly_canonical_file(shared):
    spec = SourceSpec("dolly", "dolly", str(shared / "data/dolly/dolly_canonical_12rows.json"))
    records, info = load_source(spec, False, Drops())
    assert len(records) == info["rows"] == 12
    assert all(r["category"] != "general" and r["response"] for r in records)


def test_generic_source_detects_prompt_completion_and_field_map(tmp_path):
    rows = [{"prompt": "P", "completion": "C"}]
    records, _, _ = load(tmp_path, "mine", "generic", rows)
    assert (records[0]["instruction"], records[0]["response"]) == ("P", "C")
    name, mapping = parse_field_map("mine:instruction=q,input=ctx,response=a")
    assert name == "mine" and mapping == {"instruction": "q", "input": "ctx", "response": "a"}
    records, _, _ = load(tmp_path, "mine", "generic", [{"q": "Q", "ctx": "X", "a": "A"}], field_map=mapping)
    assert (records[0]["instruction"], records[0]["input"], records[0]["response"]) == ("Q", "X", "A")


def test_messages_keep_history_and_train_last_turn(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    bad = [{"role": "user", "content": "no answer"}]
    records, _, drops = load(tmp_path, "chat", "generic", [{"messages": chat}, {"messages": bad}])
    assert len(records) == 1
    assert (records[0]["instruction"], records[0]["response"]) == ("2+2?", "4")
    assert records[0]["history"] == chat[:3]
    assert drops.by_source() == {"chat": {"no_final_assistant_turn": 1}}


def test_malformed_json_line_names_file_and_line(tmp_path):
    text = json.dumps(alpaca_rows(1)[0]) + "\n{not json\n"
    with pytest.raises(UserError, match=r"rows\.jsonl:2: malformed JSON.*--skip_bad_rows"):
        load(tmp_path, "alpaca", "alpaca", text=text)


def test_skip_bad_rows_counts_every_bad_line(tmp_path):
    good = [json.dumps(row) for row in alpaca_rows(3)]
    text = "\n".join([good[0], "{oops", good[1], "[1, 2]", good[2]]).encode() + b"\n\xff\xfe\n"
    records, info, drops = load(tmp_path, "alpaca", "alpaca", text=text, skip=True)
    assert len(records) == 3 and info["rows"] == 6
    assert drops.by_source() == {"alpaca": {"malformed_json": 1, "non_utf8": 1, "not_an_object": 1}}


def test_missing_field_names_field_and_schema(tmp_path):
    with pytest.raises(UserError, match=r"missing required field\(s\) \['output'\].*alpaca"):
        load(tmp_path, "alpaca", "alpaca", [{"instruction": "x", "input": ""}])
    with pytest.raises(UserError, match=r"\['answer'\].*gsm8k \(question, answer\)"):
        load(tmp_path, "gsm8k", "gsm8k", [{"question": "x"}])


def test_nulls_and_wrong_types_are_counted_drops(tmp_path):
    rows = [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"instruction": None, "input": "", "output": "x"},
        {"instruction": "a", "input": "", "output": 5},
        {"instruction": "b", "input": ["list"], "output": "y"},
    ]
    records, info, drops = load(tmp_path, "alpaca", "alpaca", rows)
    assert len(records) == 1 and info["rows"] == 4
    expected = {"non_string_input": 1, "non_string_response": 1, "null_instruction": 1}
    assert drops.by_source()["alpaca"] == expected


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("empty.jsonl", "", "is empty"),
        ("blank.json", "  \n", "is empty"),
        ("rows.csv", "a,b\n", "unknown extension '.csv'"),
        ("broken.json", '[{"instruction": "x",\n  "output": }]', r"broken\.json:2: malformed JSON"),
        ("latin1.json", b'[{"instruction": "caf\xe9"}]', r"latin1\.json:1: not UTF-8"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, filename, text, message):
    with pytest.raises(UserError, match=message) as info:
        load(tmp_path, "alpaca", "alpaca", filename=filename, text=text)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_field_map(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_source(SourceSpec("a", "alpaca", str(tmp_path / "nope.json")), False, Drops())
    with pytest.raises(UserError, match="expected NAME:field=column"):
        parse_field_map("mine:question")


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"could not load 'yahma/alpaca-cleaned'.*--alpaca PATH"):
        load_source(SourceSpec("alpaca", "alpaca", "yahma/alpaca-cleaned"), False, Drops())
