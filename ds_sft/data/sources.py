"""Instruction data in, normalized records out.

Every dataset ds-sft reads, whatever its columns, becomes a list of plain dicts with one shape::

    {"id": "gsm8k:41", "source": "gsm8k", "category": "math",
     "instruction": "...", "input": "...", "response": "...", "history": []}

The id is the source's name and where the row is in its file, counted from 1: its line (JSON Lines),
its element (a JSON array) or its row (parquet, a hub split), so an error about it names what to fix.

A conversation (a ``messages`` row) becomes the same shape: ``instruction`` is its last user turn,
``response`` its final assistant turn, ``history`` the turns before them (``{"role", "content"}``:
the system prompt, earlier user/assistant turns). ``prepare --train_on all`` (the default) trains
every assistant turn, ``--train_on last`` the final one (``ds_sft.data.templates``). Two shapes are
read: OpenAI's ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}`` and
ShareGPT's ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}`` (``from`` may
also say ``user``/``assistant``). A conversation is an optional system turn, then user and assistant
turns alternating, ending with an assistant turn; any other row is dropped and counted by reason
(:func:`conversation_problem`).

A *schema* maps record fields to a file's columns. The known ones cover Alpaca
(instruction/input/output), GSM8K (question/answer), Dolly in its own schema
(instruction/context/response/category) and in the renamed one (which is Alpaca's), prompt/completion
files and chat ``messages`` lists. ``--source NAME=PATH`` picks the first schema whose required
columns the file has, or uses an explicit ``--field_map``; a file whose rows are of several schemas is
refused, with the count of each (:func:`choose_schema`).

Local files are read by extension: JSON and JSON Lines by ds-sft's one JSON reader
(:mod:`ds_sft.json_input`: a repeated key, NaN, a huge integer, deep nesting, a lone surrogate are
refused; every refusal names the file and the line; ``--skip_bad_rows`` counts and leaves out bad
lines instead, by reason), parquet with pyarrow. Only regular files are opened, and reading one
takes bounded memory whatever it holds (a binary file, no newline, one gigantic line or array:
:func:`read_table`). Hub ids go through HF ``datasets``.
"""

from __future__ import annotations

import itertools
import re
import sys
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ds_sft.data.clean import Drops
from ds_sft.errors import UserError, first_line, preview
from ds_sft.json_input import JsonRefused, json_kind, parse_json_object, parse_json_value
from ds_sft.locations import expand_user
from ds_sft.model_source import hub_id
from ds_sft.safe_read import require_regular_file, sha256_file

# record field -> column; "instruction" and "response" are required, the rest optional.
SCHEMAS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "response": "output"},
    "dolly": {
        "instruction": "instruction",
        "input": "context",
        "response": "response",
        "category": "category",
    },
    "gsm8k": {"instruction": "question", "response": "answer"},
    "prompt_completion": {"instruction": "prompt", "response": "completion"},
    "messages": {"messages": "messages"},
    "sharegpt": {"messages": "conversations"},
}
REQUIRED = ("instruction", "response")
REQUIRED_BY_SCHEMA = {name: ("messages",) if "messages" in m else REQUIRED for name, m in SCHEMAS.items()}
# each schema's required columns: a row that fills them all is of that schema
REQUIRED_COLUMNS = {name: [SCHEMAS[name][key] for key in keys] for name, keys in REQUIRED_BY_SCHEMA.items()}

# Which schemas each source flag accepts, in the order they are tried. Dolly comes in its own
# schema and in a renamed one that is Alpaca's (instruction/input/output).
KIND_SCHEMAS = {
    "alpaca": ["alpaca"],
    "gsm8k": ["gsm8k"],
    "dolly": ["dolly", "alpaca"],
    "generic": ["messages", "sharegpt", "alpaca", "dolly", "gsm8k", "prompt_completion"],
}
DEFAULT_CATEGORY = {"gsm8k": "math"}  # everything else without a category column is "general"

HUB_IDS = {
    "alpaca": ("yahma/alpaca-cleaned", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "dolly": ("databricks/databricks-dolly-15k", None),
}

EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Endings of data files, read here or not: a location ending so is a file path, never a hub id.
DATA_FILE_SUFFIXES = (*EXTENSIONS, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip",
                      ".tar")  # fmt: skip


# What a --source NAME may be: the name is written into row ids (NAME:LINE), the manifest and the
# summary table, and read back out of --mix NAME=W,... and --field_map NAME:..., so it holds none of
# their separators, no spaces or control characters, and only what every encoding can write
SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# The rule in words, for the lines that refuse a name
SOURCE_NAME_RULE = "1-64 ASCII letters, digits, '_', '.' or '-' (not starting with '.' or '-')"


@dataclass
class SourceSpec:
    """One source to read: a name (``alpaca``, ``gsm8k``, ``dolly`` or the user's), a kind, a location."""

    name: str
    kind: str  # a key of KIND_SCHEMAS
    location: str  # a local path or a hub id
    field_map: dict[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """Something is at the location on disk: a file, a folder, one ``stat`` may not look at, or a
        link that leads nowhere (the user's path, refused as such by the reader, not a hub id)."""
        try:
            path = expand_user(self.location)
            return path.exists() or path.is_symlink()
        except PermissionError:  # there, behind a folder without search permission: its reader says so
            return True
        except (OSError, UserError, ValueError):  # a name too long, "~user/" of no user, a NUL byte
            return False

    @property
    def is_hub_id(self) -> bool:
        """A hub dataset id: ``owner/name`` as the hub spells repo ids (letters, digits, ``_.-``, no
        ``--`` or ``..``, neither part starting or ending with ``.`` or ``-``: so nothing that starts
        ``./``, ``../``, ``/`` or ``~``), no ``@revision``, not ending like a data file (``.json``,
        ``.csv``, ...: a mistyped path) and no such local path. Anything else is a missing file."""
        if self.is_local:
            return False
        found = hub_id(self.location)
        return (
            found is not None and found[1] is None and not self.location.lower().endswith(DATA_FILE_SUFFIXES)
        )


def parse_field_map(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:instruction=q,input=ctx,response=a`` -> ("NAME", {"instruction": "q", ...})."""
    name, sep, pairs = text.partition(":")
    allowed = {"instruction", "input", "response", "category", "messages"}
    mapping = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, column = pair.partition("=")
        if not sep or not eq or key.strip() not in allowed:
            raise UserError(
                f"--field_map {text!r}: expected NAME:field=column[,field=column...] with fields from "
                f"{sorted(allowed)}, e.g. mydata:instruction=question,response=answer"
            )
        if key.strip() in mapping:
            raise UserError(f"--field_map {text!r} maps {key.strip()!r} twice; keep one")
        mapping[key.strip()] = column.strip()
    if not mapping:
        raise UserError(
            f"--field_map {text!r} maps no field; e.g. mydata:instruction=question,response=answer"
        )
    if "messages" in mapping and len(mapping) > 1:  # a conversation's turns are all its text
        others = sorted(mapping.keys() - {"messages"})
        raise UserError(
            f"--field_map {text!r}: messages= reads whole conversations, so {others} would be ignored; "
            "map either messages or instruction/response"
        )
    return name.strip(), mapping


# --- reading a file --------------------------------------------------------------------------------

UTF8_BOM = b"\xef\xbb\xbf"
# Bounds that keep a malformed file from exhausting memory. A JSON Lines line (one row; far above any
# trainable row: a row of 2**20 tokens, the largest --seq_len, is ~5 MB of text), and a whole JSON
# array file (parsed at once, ~5x its size in memory; a larger data set belongs in JSON Lines).
MAX_LINE_BYTES = 64 << 20
MAX_ARRAY_BYTES = 512 << 20
# What one file's rows may take in Python once parsed, estimated from their bytes (_parsed_bytes): this
# many times MAX_ARRAY_BYTES. A JSON array is checked before it is parsed (it parses whole), JSON Lines
# as its rows are kept (one line at a time: a file of small rows was unbounded). Text parses to ~2-5x
# its size; tiny objects to ~25x.
MAX_PARSE_EXPANSION = 5
# What each value read from a parquet file costs once it is a Python object, at least: a pointer in its
# list and a small object (a boolean is 1/8 of a byte in Arrow). The metadata's count is checked with it
# before reading; what was read is sized by kind (_python_bytes).
PY_VALUE_BYTES = 16
HEAD_BYTES = 64 << 10  # the start of a file, checked for a byte-order mark and for NUL bytes (not text)
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _lines(handle, size: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line of ``handle``, reading no more than ``size`` bytes in all and no
    more than :data:`MAX_LINE_BYTES` at once: a longer line is read on to its end in bounded chunks and
    given as None, so a file without newlines (binary data, one gigantic JSON text) costs no memory."""
    left = size
    for lineno in itertools.count(1):
        line = handle.readline(min(MAX_LINE_BYTES + 1, left))
        if not line:
            return
        left -= len(line)
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield lineno, line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the over-long line
            line = handle.readline(min(MAX_LINE_BYTES, left))
            left -= len(line)
        yield lineno, None


def read_json_lines(handle, size: int) -> Iterator[tuple[int, bytes, dict | JsonRefused]]:
    """Each non-blank line of a JSON Lines file, as (its number from 1, its bytes, its object or why it
    is none): every line read by :func:`ds_sft.json_input.parse_json_object`'s rules, no more than
    ``size`` bytes in all and :data:`MAX_LINE_BYTES` a line (see :func:`_lines`). The caller names
    the file and the line: ``rows.jsonl:3: sets "input" twice: keep one``."""
    for lineno, raw in _lines(handle, size):
        if raw is None:
            too_long = (
                f"a line longer than {MAX_LINE_BYTES >> 20} MiB (a JSON Lines file holds one row per line; "
                "is this one JSON text, or not text at all?)"
            )
            yield lineno, b"", JsonRefused(too_long, "line_too_long")
        elif raw.strip():
            try:
                yield lineno, raw, parse_json_object(raw)
            except JsonRefused as err:
                yield lineno, raw, err


def _json_lines(
    path: Path, lines, skip_bad_rows: bool, drops: Drops, source: str
) -> tuple[list[dict], array]:
    """JSON Lines: one object per non-blank line of ``lines`` (:func:`read_json_lines`) -> (the rows, the
    line of each). A bad line raises ``UserError("file:line: ...")``, or with ``--skip_bad_rows`` is
    counted as a drop by reason and left out. The rows kept are refused once they would take more than
    the parse budget (``MAX_PARSE_EXPANSION * MAX_ARRAY_BYTES``), as an array is."""
    # numbers: 8 bytes a row, where a list of ints took 36 (45 MB for 1.25 M small rows)
    rows, numbers, blank = [], array("q"), True
    held, limit = 0, MAX_PARSE_EXPANSION * MAX_ARRAY_BYTES
    for lineno, raw, row in lines:
        blank = False
        if isinstance(row, JsonRefused):
            if not skip_bad_rows:
                raise UserError(f"{path}:{lineno}: {row}; fix the line or pass --skip_bad_rows to drop it")
            drops.add(source, row.reason)
            continue
        held += _parsed_bytes(raw)
        if held > limit:
            raise UserError(
                f"{path}:{lineno}: the rows up to this line would take ~{held / 2**20:,.0f} MiB once "
                f"parsed (a source is held whole; over {limit >> 20:,} MiB is refused): keep fewer rows, "
                "e.g. head -n N FILE > SMALLER.jsonl"
            )
        rows.append(row)
        numbers.append(lineno)
    if blank:
        raise UserError(f"{path}: the file is empty")
    if not rows:
        bad = ", ".join(f"{n} {reason}" for reason, n in drops.by_source().get(source, {}).items())
        raise UserError(f"{path}: no valid JSON rows (dropped: {bad}); check that it is the right file")
    return rows, numbers


def _parsed_bytes(data: bytes | bytearray) -> int:
    """What parsing the JSON ``data`` makes in Python, at least, counted from its bytes (a brace, a
    quote or a comma inside a string counts too: the estimate errs high): its text, a dict per ``{``
    (CPython's size of a small one), a str per pair of ``"``, a list slot and a number per ``,``."""
    dicts = data.count(b"{") * (sys.getsizeof({"": None}) + 8)
    strings = data.count(b'"') // 2 * (sys.getsizeof("") + 8)
    values = data.count(b",") * (sys.getsizeof(2**40) + 8)
    return len(data) + dicts + strings + values


def _json_array(
    path: Path, data: bytearray, skip_bad_rows: bool, drops: Drops, source: str
) -> tuple[list[dict], array]:
    """A JSON array of objects (Alpaca's layout) -> (the rows, the element number of each, from 1). It
    parses as a whole or not at all; an element that cannot be a row (see :func:`row_problem`) is
    refused, or with ``--skip_bad_rows`` counted and left out. ``data`` is the file's bytes, emptied as
    they are parsed."""
    parsed, limit = _parsed_bytes(data), MAX_PARSE_EXPANSION * MAX_ARRAY_BYTES
    if parsed > limit:
        raise UserError(
            f"{path}: a JSON array of {len(data) / 2**20:,.1f} MiB whose values would take "
            f"~{parsed / 2**20:,.0f} MiB once parsed (it is parsed as a whole; over "
            f"{limit >> 20} MiB is refused): convert it to JSON Lines "
            "(one object per line, e.g. jq -c '.[]' FILE.json > FILE.jsonl)"
        )
    try:
        rows = parse_json_value(data)
    except JsonRefused as err:
        where = f"{path}:{err.line}" if err.line else str(path)
        raise UserError(f"{where}: {err}; a JSON array is read as a whole, so fix the file") from None
    objects, numbers = [], array("q")
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict):
            objects.append(row)
            numbers.append(number)
        elif skip_bad_rows:
            drops.add(source, "not_an_object")
        else:
            raise UserError(
                f"{path}: element {number} of the array (from 1): expected a JSON object, got "
                f"{json_kind(row)}; fix it or pass --skip_bad_rows"
            )
    if not objects:
        raise UserError(f"{path}: no JSON objects in the array; check that it is the right file")
    return objects, numbers


def _read_parquet(path: Path) -> dict[str, list]:
    """A parquet file's columns, refused in one line when they would not fit :data:`MAX_ARRAY_BYTES`
    once decoded. Parquet's encodings make a small file a large table: compressed pages (a run of one
    character), dictionaries (1,000 rows naming one 1 MiB string: 1 GiB from a 1 kB file), and runs
    of one value (a billion nulls). So the size is checked from the file's metadata before reading,
    strings are read as dictionaries, and the size they decode to is checked before it is made."""
    import pyarrow.parquet as pq

    try:  # one open file: the footer checked is the footer of the file read
        with open(path, "rb") as source:
            parquet = pq.ParquetFile(source)
            meta = parquet.metadata
            chunks = [
                meta.row_group(group).column(column)
                for group in range(meta.num_row_groups)
                for column in range(meta.num_columns)
            ]
            encoded = sum(chunk.total_uncompressed_size for chunk in chunks)
            # every value, each item of a list counted (a leaf column's num_values), becomes a Python object
            values = sum(chunk.num_values for chunk in chunks)
            _check_parquet_size(path, max(encoded, PY_VALUE_BYTES * values))
            strings = [leaf.path for leaf in parquet.schema if leaf.physical_type == "BYTE_ARRAY"]
            # on this thread: Arrow's pool threads would read the Python file object, each taking the
            # GIL with a thread state of its own (a CPython 3.11 tracemalloc session crashed on them)
            table = pq.ParquetFile(source, metadata=meta, read_dictionary=strings).read(use_threads=False)
    except UserError:
        raise
    except Exception as err:  # Arrow raises many types; the user needs the file and the cause
        raise UserError(f"{path}: could not be read as parquet: {first_line(err)}") from None
    if table.num_rows == 0:
        raise UserError(f"{path}: the file has no rows")
    _check_parquet_size(path, sum(map(_decoded_bytes, table.columns)))
    try:
        return table.to_pydict()
    except Exception as err:  # a value Python cannot hold, e.g. a date32 past year 9999 (OverflowError)
        raise UserError(f"{path}: a column holds values Python cannot read: {first_line(err)}") from None


def _check_parquet_size(path: Path, size: int) -> None:
    if size > MAX_ARRAY_BYTES:
        raise UserError(
            f"{path}: its rows take {size / 2**20:,.0f} MiB once decoded; a parquet file is read whole, so "
            f"files over {MAX_ARRAY_BYTES >> 20} MiB decoded are refused: split it, or convert it to "
            "JSON Lines (one object per line)"
        )


def _python_bytes(kind) -> int:
    """What one value of Arrow type ``kind`` becomes in Python: its object (CPython's own sizes: a
    dict per struct, a list per list, a str per string; 32 bytes for a number) and its list slot."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        size = sys.getsizeof(dict.fromkeys(range(kind.num_fields)))
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        size = sys.getsizeof([])
    elif pa.types.is_dictionary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        size = sys.getsizeof("")
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        size = sys.getsizeof(b"")
    else:
        size = 32  # a float (24 bytes), an int past CPython's cached small ones (28), a date...
    return size + 8


def _decoded_bytes(values) -> int:
    """Bytes ``values`` (an Arrow array or chunked array) take in Python once read: every dictionary
    expanded (its strings' lengths taken once per index: the dictionaries hold the file's strings,
    see above), and the object each value, list and struct becomes (:func:`_python_bytes`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        return sum(map(_decoded_bytes, values.chunks))
    objects = _python_bytes(values.type) * len(values)
    if isinstance(values, pa.DictionaryArray):
        lengths = pc.take(pc.binary_length(values.dictionary), values.indices)
        return values.indices.nbytes + (pc.sum(lengths).as_py() or 0) + objects
    if isinstance(values, pa.StructArray):
        return objects + sum(_decoded_bytes(values.field(i)) for i in range(values.type.num_fields))
    if isinstance(values, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):  # maps included
        offsets = values.offsets.nbytes if hasattr(values, "offsets") else 0
        return objects + offsets + _decoded_bytes(values.values)
    return objects + values.nbytes


def read_table(path: Path, skip_bad_rows: bool, drops: Drops, source: str) -> Mapping[str, list]:
    """Read a .json / .jsonl / .parquet file into columns (name -> list of values, None where absent).

    JSON is parsed here, not by Arrow: Arrow's reader crashes the process on a file holding only
    ``null`` (pyarrow 26 segfaults) and its errors name neither the line nor the cause. A ``.json``
    file starting with ``[`` is an array of objects; any other .json or .jsonl file is JSON Lines.
    Only a regular file is opened, and no more than the size ``stat`` gave is read. Memory is bounded
    for any file: a NUL byte near the start refuses it as not text, a JSON Lines line is read up to
    :data:`MAX_LINE_BYTES` (a longer one is refused, or dropped with ``--skip_bad_rows``), and an array
    file over :data:`MAX_ARRAY_BYTES` is refused before it is read, a parquet file decoding past it
    before it is decoded, JSON Lines rows once they would parse past :data:`MAX_PARSE_EXPANSION` times it.
    """
    size = require_regular_file(path).st_size
    if path.suffix.lower() not in EXTENSIONS:
        raise UserError(f"{path}: unknown extension {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}")
    if EXTENSIONS[path.suffix.lower()] == "parquet":
        return _read_parquet(path)
    with path.open("rb") as handle:
        head = handle.read(min(size, HEAD_BYTES))
        if head.startswith(UTF16_BOMS):
            raise UserError(
                f"{path}: UTF-16 text (it opens with a UTF-16 byte-order mark); re-encode it as UTF-8"
            )
        if b"\0" in head:
            line = head[: head.index(b"\0")].count(b"\n") + 1
            raise UserError(
                f"{path}:{line}: a NUL byte, so this is not UTF-8 text (binary data, or UTF-16 without a "
                "byte-order mark?); pass the JSON or JSON Lines file itself, encoded as UTF-8"
            )
        start = len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0
        if path.suffix.lower() == ".json" and head[start:].lstrip()[:1] == b"[":
            if size > MAX_ARRAY_BYTES:
                raise UserError(
                    f"{path}: a JSON array of {size / 2**20:,.0f} MiB; one is parsed as a whole, so arrays "
                    f"over {MAX_ARRAY_BYTES >> 20} MiB are refused: convert it to JSON Lines "
                    "(one object per line, e.g. jq -c '.[]' FILE.json > FILE.jsonl)"
                )
            handle.seek(start)
            data = bytearray(size - start)
            del data[handle.readinto(data) :]  # a file cut short since stat() reads as what is left
            rows, numbers = _json_array(path, data, skip_bad_rows, drops, source)
        else:
            handle.seek(start)
            rows, numbers = _json_lines(
                path, read_json_lines(handle, size - start), skip_bad_rows, drops, source
            )
    return RowColumns(rows, numbers)


class RowColumns(Mapping):
    """JSON rows seen as columns (name -> list of values, None where a row lacks it), every key of
    any row a column, in first-seen order. A column is built when it is first read: a file whose
    rows each hold their own keys (1,000 rows of 200 keys, 2 MB) made rows x keys values when all
    were built at once (1.8 GB), where a schema reads a few. ``numbers`` holds each row's place in its
    file, from 1 (its line, or its element of an array): rows left out before do not shift it."""

    def __init__(self, rows: list[dict], numbers: array) -> None:
        self.rows = rows
        self.numbers = numbers
        self.names = dict.fromkeys(name for row in rows for name in row)
        self.built: dict[str, list] = {}

    def __getitem__(self, name: str) -> list:
        if name not in self.names:
            raise KeyError(name)
        if name not in self.built:
            self.built[name] = [row.get(name) for row in self.rows]
        return self.built[name]

    def __contains__(self, name: object) -> bool:  # Mapping's would build the column to answer
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def read_hub(spec: SourceSpec, split: str = "train") -> dict[str, list]:
    """Load a split of a hub dataset; one clear line when offline or unknown."""
    import datasets

    hub_id = spec.location
    config = "main" if hub_id == "openai/gsm8k" else None  # GSM8K has two configs; "main" is the standard one
    try:
        table = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, unknown id, gated, ...: all end the same way for the user
        flag = "--source NAME=PATH" if spec.kind == "generic" else f"--{spec.kind} PATH"
        reason = first_line(err)
        raise UserError(
            f"could not load {hub_id!r} from the Hugging Face hub ({reason}); pass a local file: {flag}"
        ) from None
    return table.to_dict()


# --- columns -> records ----------------------------------------------------------------------------


def rows_by_schema(columns: dict[str, list], schemas: list[str]) -> dict[str, list[int]]:
    """The row indices of each schema: a row is of the first of ``schemas`` whose required columns
    it fills (present and not null); a row of none is in no list."""
    filled = [zip(*(columns[col] for col in REQUIRED_COLUMNS[name]), strict=True) for name in schemas]
    rows_of: dict[str, list[int]] = {}
    for i, values in enumerate(zip(*filled, strict=True)):
        schema = next((name for name, row in zip(schemas, values, strict=True) if None not in row), None)
        if schema is not None:
            rows_of.setdefault(schema, []).append(i)
    return rows_of


def choose_schema(spec: SourceSpec, columns: dict[str, list]) -> dict[str, str]:
    """The field -> column mapping of this table, or a UserError saying what is wrong.

    The first schema the source's kind reads (:data:`KIND_SCHEMAS`) whose columns the table has. A
    table whose rows are of two or more known schemas (say a chat file appended to an Alpaca one) is
    refused with the count of each: read with one schema, the rows of the others would all be
    dropped as null fields, and read each with its own, a mistake would pass unseen. Rows of no
    schema stay, and are dropped later as ``null_<field>``. ``--field_map`` is taken as given.
    """
    # quoted in one line: a file of a thousand keys names the first ones
    names = f"[{preview([repr(name) for name in columns], 20)}]"
    if spec.field_map:
        mapping = spec.field_map
        missing = [col for col in mapping.values() if col not in columns]
        if missing:
            raise UserError(
                f"{spec.location}: --field_map names missing column(s) {missing}; columns are {names}"
            )
        if "messages" not in mapping and not all(key in mapping for key in REQUIRED):
            raise UserError(f"--field_map for {spec.name} must map instruction and response (or messages)")
        return mapping
    candidates = KIND_SCHEMAS[spec.kind]
    # every known schema, the kind's own first: rows of a schema the kind does not read are seen too
    known = candidates + [name for name in SCHEMAS if name not in candidates]
    present = [name for name in known if all(col in columns for col in REQUIRED_COLUMNS[name])]
    rows_of = rows_by_schema(columns, present) if len(present) > 1 else {}
    if len(rows_of) > 1:
        raise mixed_schemas_error(spec, rows_of)
    usable = [name for name in candidates if name in (rows_of or present)]
    if usable:
        return SCHEMAS[usable[0]]
    expected = " or ".join(f"{name} ({', '.join(SCHEMAS[name].values())})" for name in candidates)
    if rows_of:  # the kind's columns are there but empty; every row is of another schema
        raise UserError(
            f"{spec.location}: its rows are of the {next(iter(rows_of))} schema, not the {expected} "
            f"schema that --{spec.kind} reads; pass the file as --source NAME=PATH"
        )
    closest = max(candidates, key=lambda name: sum(col in columns for col in REQUIRED_COLUMNS[name]))
    missing = [col for col in REQUIRED_COLUMNS[closest] if col not in columns]
    # --field_map maps the columns of a --source only
    source = spec.name if spec.kind == "generic" else "NAME"
    fix = "" if spec.kind == "generic" else f"pass the file as --source {source}=PATH and "
    raise UserError(
        f"{spec.location}: missing required field(s) {missing}; expected the {expected} schema, "
        f"found columns {names}; {fix}map yours with --field_map {source}:instruction=COL,response=COL"
    )


def mixed_schemas_error(spec: SourceSpec, rows_of: dict[str, list[int]]) -> UserError:
    """The one-line refusal of a table whose rows are of several schemas: the count of each, its
    first row, and the fix."""
    counts = ", ".join(
        f"{len(rows)} {name} ({', '.join(REQUIRED_COLUMNS[name])}; first at row {rows[0] + 1})"
        for name, rows in rows_of.items()
    )
    if spec.kind == "generic":
        most = max(rows_of, key=lambda name: len(rows_of[name]))
        mapping = ",".join(f"{key}={SCHEMAS[most][key]}" for key in REQUIRED_BY_SCHEMA[most])
        fix = (
            f"split the file into one per schema (each its own --source), or read one schema with "
            f"e.g. --field_map {spec.name}:{mapping} (the other rows are then dropped)"
        )
    else:
        fix = f"split the file into one per schema: --{spec.kind} for its own, --source NAME=PATH for others"
    return UserError(
        f"{spec.location}: rows of {len(rows_of)} schemas: {counts}; a source has one schema: {fix}"
    )


# Conversation turns: OpenAI's role/content keys or ShareGPT's from/value, and each role's names.
TURN_KEYS = (("role", "content"), ("from", "value"))
ROLE_NAMES = {"system": "system", "user": "user", "human": "user",
              "assistant": "assistant", "gpt": "assistant"}  # fmt: skip


def conversation_problem(messages) -> tuple[list[dict], str | None]:
    """A conversation in either shape -> (its turns as ``{"role", "content"}``, None), or ([], the
    drop reason): ``empty_conversation``, ``bad_turn`` (not an object with a role and a content),
    ``non_string_content``, ``unknown_role``, ``roles_out_of_order`` (an optional system turn, then
    user and assistant alternating from a user turn), ``no_final_assistant_turn``."""
    if not isinstance(messages, list) or not messages:
        return [], "empty_conversation"
    turns = []
    for turn in messages:
        keys = next((k for k in TURN_KEYS if isinstance(turn, dict) and k[0] in turn and k[1] in turn), None)
        if keys is None:
            return [], "bad_turn"
        role, content = turn[keys[0]], turn[keys[1]]
        if not isinstance(content, str):
            return [], "non_string_content"
        if not isinstance(role, str) or role not in ROLE_NAMES:
            return [], "unknown_role"
        turns.append({"role": ROLE_NAMES[role], "content": content})
    roles = [turn["role"] for turn in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(body)):
        return [], "roles_out_of_order"
    if roles[-1] != "assistant":
        return [], "no_final_assistant_turn"
    return turns, None


def turn_weights(messages: list, turns: list[dict]) -> tuple[bool, str | None]:
    """OpenAI's ``weight`` of each assistant turn of a well-formed conversation (0: not trained, 1 or
    absent: trained) -> (only the final answer is trained, None), or (False, the drop reason):
    ``bad_turn_weight`` (not 0 or 1), ``no_trained_turn`` (every answer 0), ``unsupported_turn_weights``
    (another pattern than every answer, or the final one alone: what ``--train_on all`` and ``last``
    express). Weight-0 answers were trained all the same."""
    weights = [
        message.get("weight", 1) if isinstance(message, dict) else 1
        for message, turn in zip(messages, turns, strict=True)
        if turn["role"] == "assistant"
    ]
    if any(weight not in (0, 1) or isinstance(weight, float) for weight in weights):
        return False, "bad_turn_weight"
    if not any(weights):
        return False, "no_trained_turn"
    if all(weights):
        return False, None
    if weights[-1] and not any(weights[:-1]):
        return True, None
    return False, "unsupported_turn_weights"


def to_records(spec: SourceSpec, columns: dict[str, list], drops: Drops) -> list[dict]:
    """Map a table to records; rows with nulls or non-string fields are dropped and counted."""
    schema = choose_schema(spec, columns)
    n_rows = len(next(iter(columns.values())))
    # a row's id names it as the user finds it: its line or element in the file (RowColumns), else its
    # row of the table, counted from 1
    numbers = columns.numbers if isinstance(columns, RowColumns) else range(1, n_rows + 1)
    default_category = DEFAULT_CATEGORY.get(spec.name, DEFAULT_CATEGORY.get(spec.kind, "general"))
    records = []
    for i in range(n_rows):
        history: list[dict] = []
        values: dict = {}
        final_turn_only = False
        if "messages" in schema:
            messages = columns[schema["messages"]][i]
            turns, reason = conversation_problem(messages)
            if reason is None:
                final_turn_only, reason = turn_weights(messages, turns)
            history = turns[:-2]
            instruction, response = (turns[-2]["content"], turns[-1]["content"]) if turns else ("", "")
            extra = ""
        else:
            # optional columns (input, category) may be absent; choose_schema checked the required ones
            values = {key: columns[col][i] for key, col in schema.items() if col in columns}
            reason = None
            for key, value in values.items():
                if value is None and key in REQUIRED:
                    reason = f"null_{key}"
                elif value is not None and not isinstance(value, str):
                    reason = f"non_string_{key}"
                if reason:
                    break
            instruction, response = values.get("instruction"), values.get("response")
            extra = values.get("input") or ""
        if reason:
            drops.add(spec.name, reason)
            continue
        category = values.get("category") or default_category
        records.append(
            {
                "id": f"{spec.name}:{numbers[i]}",
                "source": spec.name,
                "category": category,
                "instruction": instruction,
                "input": extra,
                "response": response,
                "history": history,
                **({"final_turn_only": True} if final_turn_only else {}),  # earlier answers: weight 0
            }
        )
    return records


def load_source(
    spec: SourceSpec, skip_bad_rows: bool, drops: Drops, split: str = "train"
) -> tuple[list[dict], dict]:
    """Read one source -> (records, input description for the manifest: location, sha256, rows).

    ``split`` applies to hub ids only (a local file is one split).
    """
    if not spec.is_local and not spec.is_hub_id:
        raise UserError(f"{spec.location}: no such file (source {spec.name!r})")
    if spec.is_local:
        path = expand_user(spec.location)
        columns = read_table(path, skip_bad_rows, drops, spec.name)
        info = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    else:
        columns = read_hub(spec, split)
        info = {"hub_id": spec.location, "split": split}
    bad_lines = drops.total(spec.name)
    records = to_records(spec, columns, drops)
    info.update(name=spec.name, rows=len(next(iter(columns.values()))) + bad_lines)
    return records, info
