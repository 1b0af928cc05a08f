"""Reading a file needs bounded memory whatever it holds: a file of NUL bytes, a file without a
newline, one gigantic JSON line or array ends in one line (or a counted drop), never a MemoryError.

Sizes are scaled down by lowering the limits (monkeypatch); the NUL files are sparse (``truncate``),
so even the 3 GiB one takes no disk and reads in microseconds.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_sft.data import sources
from ds_sft.data.clean import Drops
from ds_sft.data.sources import read_table
from ds_sft.errors import UserError
from tests.data.helpers import alpaca_rows

LIMIT = 4096  # MAX_LINE_BYTES in these tests


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", LIMIT, raising=False)
    monkeypatch.setattr(sources, "MAX_ARRAY_BYTES", 16 * LIMIT, raising=False)


def load(path: Path, skip: bool = False):
    """Read ``path`` -> (its instructions, drops, peak bytes Python allocated while reading)."""
    drops = Drops()
    tracemalloc.start()
    try:
        columns = read_table(path, skip, drops, "a")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return columns["instruction"], drops, peak


def one_line_error(path: Path, skip: bool = False) -> str:
    with pytest.raises(UserError) as info:
        load(path, skip)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("size", [1, 100_000, 3 << 30])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("skip", [False, True])
def test_a_file_of_nul_bytes_is_refused_as_not_text_without_reading_it(tmp_path, size, suffix, skip):
    path = tmp_path / f"zeros{suffix}"
    path.touch()
    os.truncate(path, size)  # sparse: no disk
    tracemalloc.start()
    try:
        message = one_line_error(path, skip)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert f"{path}:1: a NUL byte" in message and "not UTF-8 text" in message
    assert peak < 1 << 20


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_utf16_or_32_without_a_byte_order_mark_is_refused_as_not_utf8(tmp_path, encoding):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(good_lines(3, 0).decode().encode(encoding))
    assert "not UTF-8 text" in one_line_error(path)


def good_lines(n: int, offset: int) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in alpaca_rows(n, offset))


# what a line too long to be a row can hold: no newline at all, a JSON object with a huge field, an
# array of rows on one line (a .json array misnamed .jsonl), a text of many lines joined by CR
LONG_LINES = {
    "letters": lambda n: b"x" * n,
    "huge_field": lambda n: json.dumps({"instruction": "y " * n, "output": "z"}).encode()[:n],
    "array_on_one_line": lambda n: json.dumps(alpaca_rows(n // 100 + 1)).encode()[:n],
    "cr_newlines": lambda n: good_lines(n // 100 + 1, 0).replace(b"\n", b"\r")[:n],
    "non_utf8": lambda n: b"\xff" * n,
}


@given(
    kind=st.sampled_from(sorted(LONG_LINES)),
    excess=st.integers(1, 3 * LIMIT),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
    newline_after=st.booleans(),
)
def test_a_line_over_the_limit_is_refused_or_dropped_with_bounded_memory(
    kind, excess, before, after, newline_after
):
    long_line = LONG_LINES[kind](LIMIT + excess)
    long_line = (long_line * (LIMIT + excess))[: LIMIT + excess]  # exactly this long
    tail = good_lines(after, 100) if newline_after else b""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_bytes(good_lines(before, 0) + long_line + (b"\n" if newline_after else b"") + tail)
        message = one_line_error(path)
        assert f"{path}:{before + 1}: a line longer than" in message and "--skip_bad_rows" in message
        if not before and not tail:
            return  # with --skip_bad_rows nothing is left: "no valid JSON rows", tested below
        records, drops, peak = load(path, skip=True)
    expected = alpaca_rows(before, 0) + alpaca_rows(after if newline_after else 0, 100)
    assert records == [row["instruction"] for row in expected]
    assert drops.by_source() == {"a": {"line_too_long": 1}}
    assert peak < 8 * LIMIT + (64 << 10) + 8 * len(tail)  # a few lines and the head, not the file


def test_a_line_of_exactly_the_limit_is_read(tmp_path):
    row = json.dumps({"instruction": "", "output": "z"})
    row = row.replace('""', '"' + "a" * (LIMIT - len(row)) + '"')
    assert len(row) == LIMIT
    path = tmp_path / "rows.jsonl"
    path.write_text(row + "\n" + row)
    records, drops, _ = load(path)
    assert len(records) == 2 and not drops.by_source()


def test_lines_after_a_skipped_long_line_are_read_as_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(good_lines(2, 0) + b"{}" + b" " * (5 * LIMIT) + b"\n" + good_lines(1, 9) + b"{oops\n")
    assert f"{path}:3: a line longer than" in one_line_error(path)
    records, drops, _ = load(path, skip=True)
    assert len(records) == 3 and drops.by_source() == {"a": {"line_too_long": 1, "malformed_json": 1}}


@pytest.mark.parametrize("n_rows", [600, 2000])
def test_a_json_array_over_the_limit_is_refused_before_it_is_read(tmp_path, n_rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(alpaca_rows(n_rows)))
    assert path.stat().st_size > 16 * LIMIT
    message = one_line_error(path)
    assert "arrays over" in message and "convert it to JSON Lines" in message


def test_a_json_array_under_the_limit_and_a_bom_still_read(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(alpaca_rows(20)).encode())
    records, _, _ = load(path)
    assert len(records) == 20
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good_lines(20, 0))
    records, _, _ = load(path)
    assert len(records) == 20


def test_a_json_array_is_held_at_most_twice_while_it_parses(tmp_path, monkeypatch):
    """An array is parsed as a whole, so its text and its parsed rows must coexist; its bytes need not.
    They are freed once decoded: held beside the other two, the peak was 3x the file (and more)."""
    monkeypatch.setattr(sources, "MAX_ARRAY_BYTES", 64 << 20)
    path = tmp_path / "rows.json"
    long_text = "lorem ipsum dolor sit amet " * (1 << 17)  # 3.4 MiB: the rows weigh what the file does
    rows = [{"instruction": f"row {i}", "input": "", "output": long_text} for i in range(8)]
    path.write_text(json.dumps(rows))
    size = path.stat().st_size
    records, _, peak = load(path)
    assert len(records) == 8
    assert peak < 2.3 * size, f"peak {peak / size:.2f}x the file"


def peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_rows_of_keys_of_their_own_cost_memory_by_their_size_not_rows_times_keys(
    tmp_path, suffix, monkeypatch
):
    """Every key of any row became a full-length column: 400 rows of 100 keys each their own made
    40,000 columns of 400 values (16 M values, 128 MB) from a file of 2 MB. Reading a source now holds
    the parsed rows and the columns its schema uses, a few times the parse itself."""
    monkeypatch.setattr(sources, "MAX_ARRAY_BYTES", 1 << 30)
    rows = [
        {"instruction": f"q{i}", "output": f"a{i}", **{f"k{i}_{j}": j for j in range(100)}}
        for i in range(400)
    ]
    path = tmp_path / f"keys{suffix}"
    text = json.dumps(rows) if suffix == ".json" else "\n".join(map(json.dumps, rows))
    path.write_text(text)
    spec = sources.SourceSpec("mine", "generic", str(path))
    records = []
    reading = peak_bytes(lambda: records.extend(sources.load_source(spec, False, Drops())[0]))
    parsing = peak_bytes(
        lambda: [json.loads(line) for line in text.splitlines()] if suffix == ".jsonl" else json.loads(text)
    )
    assert [r["instruction"] for r in records] == [f"q{i}" for i in range(400)]
    assert reading < 4 * parsing, (reading, parsing)


def test_a_refusal_names_the_first_columns_of_a_file_of_thousands(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ARRAY_BYTES", 1 << 30)  # its 5,000 keys parse past the test's budget
    path = tmp_path / "keys.jsonl"
    path.write_text("\n".join(json.dumps({f"k{i}_{j}": j for j in range(100)}) for i in range(50)))
    with pytest.raises(UserError, match=r"found columns \[.*'k0_19', \.\.\. 4980 more\]") as info:
        sources.load_source(sources.SourceSpec("mine", "generic", str(path)), False, Drops())
    assert len(str(info.value)) < 1000


def parquet_bombs() -> dict:
    """Small parquet files that decode to many times their size (over the 64 KiB array limit of
    these tests), each through another encoding."""
    import numpy as np
    import pyarrow as pa

    def one_string_named_by(rows: int, text: str):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([text]))

    return {
        "dictionary": (
            pa.table(
                {"instruction": one_string_named_by(100, "i" * 4096), "output": one_string_named_by(100, "o")}
            ),
            {},
        ),
        "dictionary in a conversation": (
            pa.table({"messages": pa.array([[{"role": "user", "content": "u" * 4096}] * 8] * 10)}),
            {},
        ),
        "compressed pages": (
            pa.table({"instruction": ["a" * 8192] * 20, "output": ["b"] * 20}),
            {"use_dictionary": False, "compression": "zstd"},
        ),
        "a run of nulls": (pa.table({"instruction": pa.nulls(10_000, pa.string())}), {"compression": "zstd"}),
    }


@pytest.mark.parametrize("bomb", sorted(parquet_bombs()))
def test_a_parquet_file_that_decodes_past_the_limit_is_refused_before_it_is_made(tmp_path, bomb):
    """A 1 kB parquet file of 1,000 rows naming one 1 MiB string took 2.5 GB (2,000 rows: 4.3 GB,
    10,000: killed for memory): parquet files were read whole, with no limit."""
    import pyarrow.parquet as pq

    table, options = parquet_bombs()[bomb]
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, **options)
    assert path.stat().st_size < 16 * LIMIT
    message = one_line_error(path)
    assert "MiB once decoded" in message and "split it, or convert it to JSON Lines" in message


def test_a_parquet_file_within_the_limit_reads_as_it_did(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "instruction": ["a", "b"],
        "output": ["c", None],
        "n": [1, 2],
        "messages": [[{"role": "user", "content": "x"}], []],
    }
    pq.write_table(pa.table(rows), tmp_path / "ok.parquet")
    assert dict(read_table(tmp_path / "ok.parquet", False, Drops(), "a")) == rows


def parquet_shapes() -> dict:
    """A parquet file per kind of value and count: long lists in one row (booleans are bits in
    Arrow, each a pointer and more in Python), conversations (a dict per message), plain rows."""
    import pyarrow as pa

    def text(n: int) -> list[str]:
        return [f"t{i}" for i in range(n)]  # distinct strings: CPython shares one-character ones

    shapes = {
        "booleans in a list": lambda n: {"instruction": [[True] * n], "output": ["x"]},
        "int8 in a list": lambda n: {
            "instruction": pa.array([[0] * n], pa.list_(pa.int8())),
            "output": ["x"],
        },
        "floats in a list": lambda n: {"instruction": [[i / 3 for i in range(n)]], "output": ["x"]},
        "strings in a list": lambda n: {"instruction": [text(n)], "output": ["x"]},
        "messages": lambda n: {"messages": [[{"role": "user", "content": t} for t in text(n)]]},
        "rows of strings": lambda n: {"instruction": text(n), "output": text(n)},
        "rows of floats": lambda n: {"instruction": [i / 3 for i in range(n)]},
    }
    return {
        f"{name}, {n:,}": (shape, n) for name, shape in shapes.items() for n in (100, 1_000, 4_000, 100_000)
    }


@pytest.mark.parametrize("case", sorted(parquet_shapes()))
def test_a_parquet_file_read_takes_no_more_python_memory_than_the_limit(tmp_path, case):
    """Values were counted by rows, not by the items of their lists, and at 16 bytes each: one row of
    100,000 booleans (a 786-byte file) took 12x the limit in Python, 4,000 messages in one row 15x.
    Whatever the shape, a file is refused or it is read within the limit (tracemalloc, the reference)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shape, n = parquet_shapes()[case]
    path = tmp_path / "shape.parquet"
    pq.write_table(pa.table(shape(n)), path, compression="zstd")
    tracemalloc.start()
    try:
        sources._read_parquet(path)
    except UserError as err:
        assert "MiB once decoded" in str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # + a read buffer: pyarrow reads a Python file object in chunks, as Python bytes
    assert peak <= sources.MAX_ARRAY_BYTES + (64 << 10), f"{peak / sources.MAX_ARRAY_BYTES:.2f}x the limit"


JSON_ARRAY_SHAPES = {
    "empty objects": lambda n: [{}] * n,
    "one-key objects": lambda n: [{"instruction": 1}] * n,
    "numbers in a row": lambda n: [{"instruction": "q", "output": "a", "n": list(range(1000, 1000 + n))}],
    "alpaca rows": lambda n: [
        {"instruction": f"question {i} " * 5, "input": "", "output": f"answer {i} " * 20} for i in range(n)
    ],
    "long text": lambda n: [{"instruction": "x" * (100 * n), "output": "y"}],
    "strings in a list": lambda n: [{"instruction": "q", "output": "a", "t": [f"s{i}" for i in range(n)]}],
}


# every shape and size whose file is within the array limit of these tests (larger ones are refused unread)
ARRAYS_WITHIN_THE_LIMIT = [
    (shape, n)
    for shape, make in sorted(JSON_ARRAY_SHAPES.items())
    for n in (10, 100, 1_000, 5_000)
    if len(json.dumps(make(n))) <= 16 * LIMIT
]


@pytest.mark.parametrize(("shape", "n"), ARRAYS_WITHIN_THE_LIMIT)
def test_a_json_array_under_the_size_limit_parses_within_its_memory_limit(tmp_path, shape, n):
    """The array limit weighed the file's bytes, assuming its parse ~5x that: an array of empty objects
    parses to ~21x its size, 5,000 short strings in a list to 9x (6.5x the limit in these tests). Any
    array is refused, or parsed within MAX_PARSE_EXPANSION x that limit (tracemalloc, the reference)."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(JSON_ARRAY_SHAPES[shape](n)))
    tracemalloc.start()
    try:
        read_table(path, True, Drops(), "a")
    except UserError as err:
        assert "once parsed" in str(err) and "convert it to JSON Lines" in str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    limit = sources.MAX_PARSE_EXPANSION * sources.MAX_ARRAY_BYTES
    assert peak <= limit, f"{peak / sources.MAX_ARRAY_BYTES:.2f}x the array limit"


@pytest.mark.parametrize("line", ["{}", '{"a":0}', '{"a":[1,2,3],"b":"c"}'])
def test_json_lines_rows_are_refused_once_they_would_parse_past_the_array_budget(tmp_path, line):
    """Each line was bounded, the whole file not: 10 MB of '{"a":0}' lines held 256 MB of dicts before
    the schema refused them. The rows kept are summed as they are read, against the budget a JSON
    array has, and refused at the line that passes it, with the memory held below it."""
    budget = sources.MAX_PARSE_EXPANSION * sources.MAX_ARRAY_BYTES
    lines = budget // len(line)  # a file of the budget's size in bytes, ~25x that once parsed
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{line}\n" * lines)
    tracemalloc.start()
    try:
        message = one_line_error(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    refused_at = int(re.search(r"rows\.jsonl:(\d+): the rows up to this line would take", message)[1])
    assert refused_at < lines and peak < budget


def test_json_lines_within_the_budget_still_read(tmp_path):
    rows = alpaca_rows(40)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert sources._parsed_bytes(path.read_bytes()) < sources.MAX_PARSE_EXPANSION * sources.MAX_ARRAY_BYTES
    assert load(path)[0] == [row["instruction"] for row in rows]
