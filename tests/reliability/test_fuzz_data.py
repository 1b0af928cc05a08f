"""Property-based fuzzing of the data path: bad rows never crash it and are never lost silently.

Hypothesis writes instruction files full of what real scraped data holds: nulls, numbers, NaN,
nested objects, control characters, lone UTF-16 surrogates (half an emoji), huge strings, duplicate
keys, invalid UTF-8 bytes at any place, non-object lines, a file that is only ``null`` or another
scalar, nesting past the parser's recursion limit, integers longer than ``int()`` converts, UTF-8 and
UTF-16 byte-order marks, a file cut off mid-row. Each file goes through the front half of
``prepare`` (read -> records -> clean -> dedup -> template -> tokenize), and two properties must hold:

- the only exception that may escape is :class:`UserError`, in one line (a traceback is a bug);
- every row is accounted for: ``rows_in == kept + dropped (by reason)``, where ``rows_in`` is counted
  here from the bytes written (non-blank lines, or the array's length), not taken from the code
  under test.

Then the whole command, ``python -m ds_sft.cli prepare`` in a subprocess, over a matrix of the
files that crashed or hung it (SIGSEGV on ``null``, UnicodeDecodeError tracebacks, RecursionError, a
FIFO, ``/dev/zero``, a folder named ``x.json``, symlinks to them): exit 2, stderr exactly one line
naming the file, no traceback, no hang, and no output folder written.

Example counts are modest, so this stays a few-second test; ``make fuzz`` hunts harder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from ds_sft.data.clean import Drops, clean_records, normalize_text
from ds_sft.data.sources import SourceSpec, load_source
from ds_sft.data.templates import render_prompt
from ds_sft.data.tokenize import tokenize_records
from ds_sft.errors import UserError
from tests.data.helpers import dedup

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=settings.default.suppress_health_check,
)

COLUMNS = ["instruction", "input", "output", "context", "response", "category", "question", "answer",
           "prompt", "completion", "messages", "extra"]  # fmt: skip
NASTY = ["\x00", "\x1b[31m", "\u202e", "\ufeff", "\r\n", "\r", "\u2028", "\x85", "\ud83d", "\udc00",
         "{instruction}", "{0}", "%s", "### Response:", "<|endoftext|>", "<<48/2=24>>", "\n#### 42",
         "<noinput>", "   ", "\t\t"]  # fmt: skip

BOMS = [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]  # UTF-8, UTF-16 LE, UTF-16 BE

texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=8)), max_size=6).map("".join),
    st.sampled_from(["lorem ipsum ", "x"]).flatmap(lambda w: st.integers(1, 3).map(lambda k: w * k * 50_000)),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
turns = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", "system", 3]), "content": values}
)
plausible_rows = st.fixed_dictionaries(
    {"instruction": texts, "output": texts},
    optional={"input": texts, "category": values, "context": texts, "response": texts},
)
rows = st.one_of(
    plausible_rows,  # listed three times: most rows of a real file are fine, which is where losses hide
    plausible_rows,
    plausible_rows,
    st.dictionaries(st.sampled_from(COLUMNS), values, max_size=6),
    st.fixed_dictionaries({"messages": st.lists(turns, max_size=4)}),
    st.fixed_dictionaries({"question": texts, "answer": texts.map(lambda t: t + "\n#### 7")}),
)


@st.composite
def instruction_files(draw) -> tuple[str, bytes, int]:
    """(suffix, file bytes, number of rows written) for a JSONL, JSON-array or JSONL-in-.json file."""
    table = draw(st.lists(rows, min_size=1, max_size=8))
    ascii_only = draw(st.booleans())
    dumps = [json.dumps(row, ensure_ascii=ascii_only) for row in table]
    layout = draw(st.sampled_from(["jsonl", "json-array", "jsonl-as-json"]))
    if layout == "json-array":
        return ".json", _utf8("[\n" + ",\n".join(dumps) + "\n]"), len(table)
    lines = [_utf8(line) for line in dumps]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["invalid_utf8", "duplicate_key", "not_object", "blank", "garbage",
                                     "deep", "huge_int"]))  # fmt: skip
        if kind == "invalid_utf8":
            cut = draw(st.integers(0, len(lines[at])))
            bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
            lines[at] = lines[at][:cut] + bad + lines[at][cut:]
        elif kind == "duplicate_key" and lines[at].startswith(b"{"):
            key = draw(st.sampled_from(["instruction", "output", "question"]))
            value = json.dumps(draw(scalars))
            lines[at] = b"{" + _utf8(f"{json.dumps(key)}: {value}, ") + lines[at][1:]
        elif kind == "not_object":
            lines[at] = draw(st.sampled_from([b"[1, 2]", b"42", b'"text"', b"null"]))
        elif kind == "deep":  # past the parser's recursion limit, as a value or as the whole line
            depth = draw(st.sampled_from([900, 5_000, 100_000]))
            nested = b"[" * depth + b"]" * depth
            lines[at] = draw(st.sampled_from([nested, b'{"instruction": ' + nested + b', "output": "x"}']))
        elif kind == "huge_int":  # int() refuses over 4,300 digits: a ValueError, not a JSONDecodeError
            lines[at] = b'{"instruction": ' + b"7" * 5_000 + b', "output": "x"}'
        elif kind == "garbage":
            lines[at] = lines[at][: draw(st.integers(0, len(lines[at])))]  # a row cut short
        else:
            lines.insert(at, b"   ")
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))
    if draw(st.integers(0, 9)) == 0:  # the whole file one JSON scalar: pyarrow segfaulted on "null"
        data = draw(st.sampled_from([b"null", b"null\n", b"42", b'"text"', b"true", b"[]", b"{}"]))
    if draw(st.integers(0, 4)) == 0:
        data = draw(st.sampled_from(BOMS)) + data
    if draw(st.integers(0, 7)) == 0:
        data = data[: draw(st.integers(1, len(data)))]  # the whole file cut off mid-write
    n_rows = sum(1 for line in data.removeprefix(BOMS[0]).split(b"\n") if line.strip())
    return (".jsonl" if layout == "jsonl" else ".json"), data, n_rows


def _utf8(text: str) -> bytes:
    # ensure_ascii=False writes lone surrogates as raw (invalid) UTF-8 bytes, as broken exporters do
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    from ds_sft.data.tokenizer import load_tokenizer

    return load_tokenizer(str(gpt2_tokenizer_dir))


# Files that crashed the reader before it parsed JSON itself (pyarrow / datasets), one per class
OK_LINE = b'{"instruction": "ok", "output": "x"}\n'
NULL_FILE = (".json", b"null", 1)  # pyarrow 26's read_json: SIGSEGV
LONE_SURROGATE = (".jsonl", OK_LINE * 2 + b'{"instruction": "x", "output": "y", "input": "\\ud83d"}\n', 3)
REGRESSIONS = [
    NULL_FILE,
    (".jsonl", b"null\nnull\n", 2),
    (".json", BOMS[0] + b'[{"instruction": "caf\xe9", "output": "x"}]', 1),  # UnicodeDecodeError
    (".jsonl", OK_LINE + b'{"instruction": "a\xff", "output": "b"}\n', 2),
    (".jsonl", OK_LINE + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2),  # RecursionError
    (".jsonl", OK_LINE + b'{"instruction": ' + b"7" * 5_000 + b"}\n", 2),  # int() digit limit
    (".json", '[{"instruction": "a", "output": "b"}]'.encode("utf-16"), 1),
    (".json", b'[{"instruction": "a", "output": "b"}, 42, null]', 3),
    LONE_SURROGATE,
    (".json", b'[{"instruction": "a", "output": "b"}, {"instruction": "\\udc00", "output": "b"}]', 2),
]


def with_regressions(test):
    """Replay every regression file, with and without --skip_bad_rows, before any generated one."""
    for file in REGRESSIONS:
        for skip in (False, True):
            test = example(file=file, kind="alpaca", skip_bad_rows=skip)(test)
    return test


@FUZZ
@with_regressions
@given(
    file=instruction_files(),
    kind=st.sampled_from(["alpaca", "dolly", "gsm8k", "generic"]),
    skip_bad_rows=st.booleans(),
)
def test_bad_rows_are_refused_or_counted_never_lost(tokenizer, file, kind, skip_bad_rows):
    suffix, data, n_rows = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        path.write_bytes(data)
        spec = SourceSpec(name=kind, kind=kind, location=str(path))
        drops = Drops()
        try:
            records, info = load_source(spec, skip_bad_rows, drops)
            kept = dedup(clean_records(records, drops, gsm8k=kind == "gsm8k"), drops)
            docs = tokenize_records(kept, tokenizer, "alpaca", {kind: 0})
        except UserError as err:
            assert "\n" not in str(err), f"a UserError must be one line: {err!r}"
            event(f"refused: {str(err).split(': ', 1)[-1][:40]}")
            return
    event(f"read: {len(kept)} of {info['rows']} rows kept")
    is_array = data.lstrip(b"\xef\xbb\xbf \n").startswith(b"[")
    if not is_array:
        assert info["rows"] == n_rows, "rows_in differs from the non-blank lines in the file"
    assert info["rows"] == len(kept) + drops.total(kind), drops.by_source()
    assert len(docs) == len(kept)
    for record in kept:
        assert all(isinstance(record[key], str) for key in ("instruction", "input", "response", "category"))


cleaned_texts = texts.map(normalize_text)  # what prepare hands the template


@FUZZ
@given(
    instruction=cleaned_texts,
    extra=cleaned_texts,
    history=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), cleaned_texts), max_size=2),
)
def test_alpaca_template_keeps_every_character(instruction, extra, history):
    """Braces, format specs and template markers inside a (cleaned) row are text, not template syntax."""
    record = {"instruction": instruction, "input": extra,
              "history": [{"role": role, "content": content} for role, content in history]}  # fmt: skip
    prompt = render_prompt(record, "alpaca")
    assert instruction in prompt
    assert extra in prompt
    assert all(content in prompt for _, content in history)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=settings.default.suppress_health_check,
)
@example(file=NULL_FILE, skip_bad_rows=False)  # killed the whole command with SIGSEGV
@example(file=LONE_SURROGATE, skip_bad_rows=False)  # UnicodeEncodeError in dedup, once JSON was parsed here
@given(file=instruction_files(), skip_bad_rows=st.booleans())
def test_prepare_manifest_accounts_for_every_row(gpt2_tokenizer_dir, file, skip_bad_rows):
    """The whole ``ds-sft prepare`` command: exit 0 with a manifest whose counts add up, or exit 2."""
    import contextlib
    import io

    from ds_sft.cli import main

    suffix, data, n_rows = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        path.write_bytes(data)
        argv = ["prepare", "--source", f"fuzz={path}", "--tokenizer", str(gpt2_tokenizer_dir),
                "--seq_len", "256", "--output_dir", str(Path(tmp) / "out"), "--force"]  # fmt: skip
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv + (["--skip_bad_rows"] if skip_bad_rows else []))
        if code != 0:
            prefix = "ds-sft prepare: error: "
            errors = [line for line in stderr.getvalue().splitlines() if line.startswith(prefix)]
            assert code == 2 and len(errors) == 1, stderr.getvalue()[-2000:]
            event(f"refused: {errors[0][len(prefix) :][:40]}")
            return
        counts = json.loads((Path(tmp) / "out" / "manifest.json").read_text())["counts"]["fuzz"]
    event(f"prepared: {counts['kept']} of {counts['rows_in']} kept")
    is_array = data.lstrip(b"\xef\xbb\xbf \n").startswith(b"[")
    if not is_array:
        assert counts["rows_in"] == n_rows
    assert counts["rows_in"] == counts["kept"] + sum(counts["dropped"].values()), counts


# --- the command end to end, in a subprocess: a crash, a hang or a traceback cannot hide ----------

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTENT = {  # file name -> bytes; each is run with and without --skip_bad_rows
    "null.json": b"null",
    "null.jsonl": b"null\n",
    "scalar.json": b"42",
    "empty_array.json": b"[]",
    "bad_utf8.json": b'[{"instruction": "caf\xe9", "output": "x"}]',
    "bad_utf8_bom.json": BOMS[0] + b'[{"instruction": "caf\xe9", "output": "x"}]',
    "bad_utf8.jsonl": b'{"instruction": "a\xff", "output": "b"}\n',
    "bad_utf8_bom.jsonl": BOMS[0] + b'{"instruction": "a\xff", "output": "b"}\n',
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
    "deep.jsonl": b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b', "output": "x"}\n',
    "huge_int.jsonl": b'{"instruction": ' + b"7" * 5_000 + b', "output": "x"}\n',
    "utf16.json": '[{"instruction": "a", "output": "b"}]'.encode("utf-16"),
}
SPECIAL = ["dir.json", "fifo.jsonl", "/dev/null", "/dev/zero", "link_to_zero.json", "link_to_fifo.jsonl",
           "link_to_dir.json", "broken_link.json"]  # fmt: skip
MATRIX = [(name, skip) for name in CONTENT for skip in (False, True)] + [(name, False) for name in SPECIAL]


def make_input(root: Path, name: str) -> Path:
    if name.startswith("/dev/"):
        return Path(name)
    path = root / name
    if name in CONTENT:
        path.write_bytes(CONTENT[name])
    elif name == "dir.json":
        path.mkdir()
    elif name == "fifo.jsonl":
        os.mkfifo(path)
    elif name == "link_to_zero.json":
        path.symlink_to("/dev/zero")
    elif name == "link_to_fifo.jsonl":
        path.symlink_to(make_input(root, "fifo.jsonl"))
    elif name == "link_to_dir.json":
        path.symlink_to(make_input(root, "dir.json"))
    else:
        path.symlink_to(root / "gone.json")
    return path


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """Every case of MATRIX through ``python -m ds_sft.cli prepare``, four at a time (each ~0.3 s of CPU)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}

    # made here, not in the threads: mktemp is not thread-safe (two threads creating pytest's base
    # folder at once made one of them fail, "cli is not a normalized and relative path")
    roots = {case: tmp_path_factory.mktemp("cli") for case in MATRIX}

    def run(case):
        name, skip = case
        root = roots[case]
        path = make_input(root, name)
        argv = [sys.executable, "-m", "ds_sft.cli", "prepare", "--source", f"fuzz={path}",
                "--output_dir", str(root / "out")] + (["--skip_bad_rows"] if skip else [])  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, env=env, timeout=120)
        except subprocess.TimeoutExpired:
            return path, root, None, "hung for 120 s"
        return path, root, done.returncode, done.stderr.decode(errors="replace")

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(MATRIX, pool.map(run, MATRIX), strict=True))


@pytest.mark.parametrize(("name", "skip_bad_rows"), MATRIX)
def test_cli_refuses_malformed_and_special_files_in_one_line(cli_runs, name, skip_bad_rows):
    path, root, code, stderr = cli_runs[(name, skip_bad_rows)]
    lines = stderr.strip().splitlines()
    assert code == 2 and "Traceback" not in stderr, f"exit {code}: {stderr[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("ds-sft prepare: error: "), stderr
    assert str(path) in lines[0], f"the error does not name {path}: {lines[0]}"
    assert not (root / "out").exists() and not list(root.glob(".out.new-*")), "an output was left behind"
