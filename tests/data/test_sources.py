"""Sources: each schema maps to the normalized record; each bad input is a clear error or a counted drop."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.data.clean import Drops
from ds_sft.data.sources import KIND_SCHEMAS, SourceSpec, load_source, parse_field_map, to_records
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
        "id": "alpaca:1",
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
    with pytest.raises(UserError, match=r"rows\.jsonl:2: not valid JSON.*--skip_bad_rows"):
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
        ("broken.json", '[{"instruction": "x",\n  "output": }]', r"broken\.json:2: not valid JSON"),
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


# --- one schema per source ----------------------------------------------------------------------

# A row of each known schema, by the schema it must be read with (the only columns it has).
ROW_OF_SCHEMA = {
    "alpaca": lambda i: {"instruction": f"Do {i}", "input": "", "output": f"Done {i}"},
    "dolly": lambda i: {"instruction": f"Ask {i}", "context": "", "response": f"Said {i}", "category": "qa"},
    "gsm8k": lambda i: {"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"},
    "prompt_completion": lambda i: {"prompt": f"P{i}", "completion": f"C{i}"},
    "messages": lambda i: {"messages": [{"role": "user", "content": f"u{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"h{i}"},
                                             {"from": "gpt", "value": f"g{i}"}]},
}  # fmt: skip


def table(rows: list[dict]) -> dict[str, list]:
    """Columns as read_table gives them: every key in first-seen order, None where a row lacks it."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


@given(
    kind=st.sampled_from(sorted(KIND_SCHEMAS)),
    schemas=st.lists(st.sampled_from(sorted(ROW_OF_SCHEMA)), min_size=1, max_size=40),
    nulls=st.integers(0, 3),
)
def test_a_table_of_several_schemas_is_refused_with_each_count(kind, schemas, nulls):
    """Rows are of known schemas in any interleaving (plus rows with a null required field, which
    are no schema's). One schema: every row is read with it (or the kind refuses it by name).
    Several: one line naming each schema's count and first row, where the old reader kept one
    schema's rows and dropped the rest as null fields."""
    rows = [ROW_OF_SCHEMA[name](i) for i, name in enumerate(schemas)]
    rows += [{**ROW_OF_SCHEMA[schemas[0]](99), **dict.fromkeys(ROW_OF_SCHEMA[schemas[0]](99), None)}] * nulls
    spec = SourceSpec("mine", kind, "rows.jsonl")
    drops = Drops()
    expected = dict.fromkeys(name for name in schemas)  # first-seen order
    if len(expected) > 1:
        with pytest.raises(UserError) as info:
            to_records(spec, table(rows), drops)
        message = str(info.value)
        assert "\n" not in message and f"rows of {len(expected)} schemas" in message
        for name in expected:
            assert f"{schemas.count(name)} {name} (" in message
            assert f"first at row {schemas.index(name) + 1})" in message
        return
    (schema,) = expected
    if schema not in KIND_SCHEMAS[kind]:
        with pytest.raises(UserError, match=f"missing required|not the .* schema that --{kind} reads"):
            to_records(spec, table(rows), drops)
        return
    records = to_records(spec, table(rows), drops)
    assert len(records) == len(schemas) and sum(drops.by_source().get("mine", {}).values()) == nulls


def test_mixed_file_through_prepare_is_one_line(run_prepare, tmp_path):
    """The red team's file: 200 Alpaca rows, then 3 chat rows (3 of 203 were kept). Refused, and the
    suggested --field_map reads the Alpaca rows, counting the chat rows as dropped."""
    rows = [ROW_OF_SCHEMA["alpaca"](i) for i in range(200)] + [ROW_OF_SCHEMA["messages"](i) for i in range(3)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    flags = ["--source", f"d={path}", "--output_dir", str(tmp_path / "out"), "--decontam_threshold", "0"]
    with pytest.raises(
        UserError, match=r"200 alpaca .*first at row 1\), 3 messages .*first at row 201\)"
    ) as info:
        run_prepare(flags)
    field_map = re.search(r"--field_map (\S+)", str(info.value))[1]
    manifest = run_prepare([*flags, "--field_map", field_map])
    assert manifest["counts"]["d"]["rows_in"] == 203 and manifest["counts"]["d"]["dropped"] == {
        "null_instruction": 3
    }


# --- a missing path is a missing file, a hub id goes to the hub ------------------------------------

HUB_DATASETS = [
    "yahma/alpaca-cleaned",
    "openai/gsm8k",
    "databricks/databricks-dolly-15k",
    "teknium/OpenHermes-2.5",
    "HuggingFaceH4/ultrachat_200k",
    "tatsu-lab/alpaca",
    "a/b",
    "data/train",
]
MISSING_PATHS = ["./typo", "../typo", "./typo.json", "mydata/train.jsonl", "data/train.json", "/abs/missing",
                 "~/missing-hH-file", "~no_such_user_hH/x.json", "a/b/c", "a/", "/a", ".hidden/x", "x/.y",
                 "a--b/c", "a/b.parquet", "A/B.JSONL", "owner/name@main", "x/y.csv", "x/y.jsonl.gz",
                 "with space/x", "a\0b/c", "x" * 300 + "/y", "typo", "typo.json", "-a/b", "a/b-",
                 "a/b."]  # fmt: skip


@pytest.fixture
def hub(monkeypatch):
    """read_hub replaced by a local table (three Alpaca rows): the ids it was asked for are listed."""
    from ds_sft.data import sources

    asked = []

    def read_hub(spec, split="train"):
        asked.append(spec.location)
        return table(alpaca_rows(3))

    monkeypatch.setattr(sources, "read_hub", read_hub)
    return asked


def where_it_goes(location: str, asked: list[str]) -> str:
    """ "hub" when load_source read ``location`` from the hub, "missing" for the one-line refusal."""
    try:
        records, info = load_source(SourceSpec("x", "alpaca", location), False, Drops())
    except UserError as err:
        assert str(err) == f"{location}: no such file (source 'x')" and not asked
        return "missing"
    assert asked == [location] and info["hub_id"] == location and len(records) == 3
    return "hub"


@pytest.mark.parametrize("location", HUB_DATASETS + MISSING_PATHS)
def test_hub_ids_go_to_the_hub_and_missing_paths_are_missing_files(hub, location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert where_it_goes(location, hub) == ("hub" if location in HUB_DATASETS else "missing")


# the hub's alphabet: a name neither starts nor ends with "-" or "." (huggingface_hub's validate_repo_id)
segment = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,14}[A-Za-z0-9_])?", fullmatch=True).filter(
    lambda s: "--" not in s
)


@given(
    owner=segment,
    name=segment,
    version=st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,2}|\.v[0-9]", fullmatch=True)),
    prefix=st.sampled_from(["./", "../", "/", "~/", "~hH_nobody/", "../../", "/tmp/hH-missing/"]),
    suffix=st.sampled_from([".json", ".jsonl", ".parquet", ".JSON", ".csv", ".jsonl.gz", ".txt"]),
)
def test_generated_locations_are_told_apart(tmp_path_factory, owner, name, version, prefix, suffix):
    """owner/name ids of the hub's alphabet go to the hub; the same with a path prefix or a data
    file ending (the mistyped paths the old code looked up on the hub) are missing files."""
    asked: list[str] = []
    from ds_sft.data import sources

    original = sources.read_hub
    sources.read_hub = lambda spec, split="train": asked.append(spec.location) or table(alpaca_rows(3))
    try:
        with contextlib.chdir(tmp_path_factory.mktemp("cwd")):
            assert where_it_goes(f"{owner}/{name}{version}", asked) == "hub"
            asked.clear()
            assert where_it_goes(f"{prefix}{owner}/{name}{version}", asked) == "missing"
            assert where_it_goes(f"{owner}/{name}{version}{suffix}", asked) == "missing"
            assert where_it_goes(f"{prefix}{owner}", asked) == "missing"
    finally:
        sources.read_hub = original


def test_a_local_path_spelled_like_a_hub_id_wins(hub, tmp_path, monkeypatch):
    """./openai/gsm8k on disk is that file (refused for its missing extension), not the hub's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()
    write_jsonl(tmp_path / "openai" / "gsm8k", alpaca_rows(2))
    with pytest.raises(UserError, match="unknown extension"):
        load_source(SourceSpec("x", "gsm8k", "openai/gsm8k"), False, Drops())
    assert not hub


@pytest.mark.parametrize("location", ["data.json", "owner/name", "./typo"])
def test_a_link_that_leads_nowhere_is_the_users_path(hub, tmp_path, monkeypatch, location):
    """Even spelled like a hub id, a dangling symlink is a local path: refused as a broken link."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / location).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / location).symlink_to(tmp_path / "gone.json")
    with pytest.raises(UserError, match="a symlink to a missing file"):
        load_source(SourceSpec("x", "alpaca", location), False, Drops())
    assert not hub


@pytest.mark.parametrize("kind", ["alpaca", "gsm8k", "dolly", "source"])
def test_the_fix_a_missing_field_refusal_suggests_works(run_prepare, tmp_path, kind):
    """Columns of no known schema: the refusal's --field_map (through --source for a --alpaca,
    --gsm8k or --dolly file, as only a --source takes one) reads the file."""
    path = write_jsonl(
        tmp_path / "qa.jsonl", [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(30)]
    )
    out = ["--output_dir", str(tmp_path / "out"), "--decontam_threshold", "0"]
    flag = ["--source", f"mine={path}"] if kind == "source" else [f"--{kind}", str(path)]
    with pytest.raises(UserError, match="missing required field") as info:
        run_prepare([*flag, *out])
    fix = re.search(r"--field_map (\S+):instruction=COL,response=COL", str(info.value))
    name = fix[1].replace("NAME", "mine")
    assert ("--source NAME=PATH" in str(info.value)) == (kind != "source")
    manifest = run_prepare(
        ["--source", f"{name}={path}", "--field_map", f"{name}:instruction=q,response=a", *out]
    )
    assert manifest["counts"][name]["rows_in"] == 30 and manifest["counts"][name]["dropped"] == {}


def _rows_file(tmp_path, layout: str):
    """Three good Alpaca rows among rows left out (bad lines or elements, skipped; a null
    instruction, dropped), and the id each good row must get: where it is in the file, from 1."""
    good = alpaca_rows(3)
    null = {**good[0], "instruction": None}
    if layout == "jsonl":  # lines: bad, blank, good, bad, good, null, good
        path = tmp_path / "rows.jsonl"
        lines = [
            "{oops",
            "",
            json.dumps(good[0]),
            "[1]",
            json.dumps(good[1]),
            json.dumps(null),
            json.dumps(good[2]),
        ]
        path.write_text("\n".join(lines) + "\n")
        return path, ["a:3", "a:5", "a:7"]
    if layout == "json array":  # elements: not an object, good, not an object, good, null, good
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(["x", good[0], 5, good[1], null, good[2]]))
        return path, ["a:2", "a:4", "a:6"]
    import datasets  # parquet rows: good, null, good, good

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([good[0], null, good[1], good[2]]).to_parquet(str(path))
    return path, ["a:1", "a:3", "a:4"]


@pytest.mark.parametrize("layout", ["jsonl", "json array", "parquet"])
def test_a_row_id_is_where_the_row_is_in_its_file_from_1(tmp_path, layout):
    """An error about a row names it by its id: it was the row's index among the rows kept, from 0,
    so after skipped lines a template refusal of line 4 said 'x:0'."""
    path, ids = _rows_file(tmp_path, layout)
    records, _ = load_source(SourceSpec("a", "alpaca", str(path)), True, Drops())
    assert [record["id"] for record in records] == ids


def test_a_refused_array_element_is_counted_from_1_as_ids_are(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([alpaca_rows(1)[0], "x"]))
    with pytest.raises(
        UserError, match=r"rows\.json: element 2 of the array \(from 1\): expected a JSON object"
    ):
        load_source(SourceSpec("a", "alpaca", str(path)), False, Drops())


FIELDS = ["instruction", "input", "response", "category", "messages"]


@pytest.mark.parametrize("field", FIELDS)
def test_a_field_mapped_twice_in_one_field_map_is_refused(field):
    """The last column silently won."""
    with pytest.raises(UserError, match=f"maps '{field}' twice"):
        parse_field_map(f"mine:{field}=a,{field}=b")


@pytest.mark.parametrize("other", [f for f in FIELDS if f != "messages"])
def test_messages_with_another_field_is_refused(other):
    """A conversation's turns are its whole text: the other field was silently ignored."""
    for text in (f"mine:messages=conv,{other}=x", f"mine:{other}=x,messages=conv"):
        with pytest.raises(
            UserError, match=rf"would be ignored.*\['{other}'\]|\['{other}'\] would be ignored"
        ):
            parse_field_map(text)
