"""JSON a user hands ds-sft (a DeepSpeed config, a model's config.json, a manifest): one reader.

Python's ``json`` module takes more than JSON interchange can carry, and each extra is a later
surprise: a repeated key keeps its last value (other readers keep the first, so a recipe that says
two things says neither); ``NaN``, ``Infinity`` and ``1e400`` (read as inf) are floats that DeepSpeed,
torch and every strict reader refuse; an integer of more digits than ``int()`` converts is a
ValueError that names a Python setting; and a value nested hundreds deep reads, then breaks the first
recursive walk of it (``copy.deepcopy``, DeepSpeed's config reader) with a RecursionError; a
``\ud800`` escape is half a UTF-16 surrogate pair, a string no UTF-8 writer or tokenizer takes.
:func:`parse_json_value` refuses each of these with one line naming the key
(``"optimizer.params.eps" is NaN, not a finite number``); :func:`parse_json_object` also refuses a
top level that is not an object. Each refusal carries a short ``reason`` (``repeated_key``) by which
a data source counts the rows it drops. The file (and line) is named by the caller:
:func:`ds_sft.safe_read.read_json_object`, :func:`ds_sft.data.sources.read_json_lines`.
"""

from __future__ import annotations

import json
import math
import re

# Deeper than any config (HF's config.json nests 3 levels), and far below the interpreter's recursion
# limit, so that every walk of an accepted value (deepcopy, DeepSpeed's reader) has room to recurse.
MAX_DEPTH = 100


JSON_KINDS = {list: "a JSON list", str: "a JSON string", bool: "JSON true or false", type(None): "JSON null"}

# A \u escape of a UTF-16 surrogate, or an escaped backslash (consumed first, so that ``\\ud800`` is
# not taken for an escape): json makes a high and a low escape side by side one character, and leaves
# any other in the string, where it is no text. Only a text holding one is searched for it.
SURROGATE_ESCAPE = re.compile(r"\\\\|\\u[dD]([89abAB]|[c-fC-F])[0-9a-fA-F]{2}")
SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_kind(value) -> str:
    """What a parsed JSON value is, in a message's words: "a JSON list", "a JSON number"..."""
    return "a JSON object" if isinstance(value, dict) else JSON_KINDS.get(type(value), "a JSON number")


def long_integer(digits: int) -> str:
    """How a message names an integer too long to show (``repr`` and ``int()`` stop at 4,300 digits)."""
    return f"an integer of {digits:,} digits"


class JsonRefused(ValueError):
    """Why a text is not JSON ds-sft reads: one line, without the file's name. ``reason`` names the
    kind of problem in a word a drop count can use (``repeated_key``, ``not_an_object``...); ``line``
    is the text's line where the text is no JSON at all (None otherwise: the message names the key)."""

    def __init__(self, message: str, reason: str, line: int | None = None):
        super().__init__(message)
        self.reason, self.line = reason, line


class NotJson(JsonRefused):
    """The text is no JSON at all (not UTF-8, a syntax error): a torn or damaged file, where a plain
    :class:`JsonRefused` is JSON holding what ds-sft refuses (a repeated key, NaN, not an object)."""


class _Repeated(dict):
    """A JSON object that held ``key`` more than once (marked by the reader, found with its path)."""

    def __init__(self, pairs: list, key: str):
        super().__init__(pairs)
        self.key = key


class _Unreadable:
    """A number Python read as no finite value (NaN, Infinity, 1e400) or could not read (an integer
    past ``int()``'s digit limit): kept in the tree so that the refusal can name its key."""

    def __init__(self, text: str, why: str, reason: str):
        self.text, self.why, self.reason = text, why, reason


class _Hooks:
    """json's hooks for one parse: each marks what it refuses in the tree and counts it, so that a
    text with nothing marked, few brackets and no surrogate escape is not walked at all."""

    def __init__(self, finite: bool):
        self.finite, self.marked = finite, 0

    def mark(self, marker):
        self.marked += 1
        return marker

    def object(self, pairs: list) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                return self.mark(_Repeated(pairs, key))
            seen.add(key)
        return dict(pairs)

    def float(self, text: str):
        value = float(text)
        if math.isfinite(value) or not self.finite:
            return value
        return self.mark(_Unreadable(text, "not a finite number", "non_finite_number"))

    def int(self, text: str):
        try:
            return int(text)
        except ValueError:  # more digits than int() converts (sys.set_int_max_str_digits)
            digits = long_integer(len(text.lstrip("-")))
            return self.mark(_Unreadable(f"{text[:12]}...", digits, "huge_integer"))

    def constant(self, text: str):  # NaN, Infinity, -Infinity
        return self.float(text)


def _may_hold_lone_surrogate(text: str) -> bool:
    """Whether ``text`` has a surrogate escape that is not half of a high-low pair written side by
    side, or a surrogate character (in a str handed in): JSON text (emoji escaped as pairs) passes
    without a walk of its parsed value."""
    if SURROGATE.search(text):
        return True
    pending_high = None  # where the high escape just read ends
    for escape in SURROGATE_ESCAPE.finditer(text):
        if escape.group(1) is None:  # an escaped backslash
            continue
        high = escape.group(1) in "89abAB"
        if pending_high is not None and (high or escape.start() != pending_high):
            return True  # a high one not followed at once by a low one
        if pending_high is None and not high:
            return True  # a low one after no high one
        pending_high = escape.end() if high else None
    return pending_high is not None


def _shown(path: tuple) -> str:
    """A key path as a message shows it: a key's lone surrogate as its escape, not as a broken char."""
    if not path:
        return "the top level"
    return '"' + ".".join(path).encode("utf-8", "backslashreplace").decode() + '"'


def _first_problem(tree, strings: bool) -> tuple[str, str] | None:
    """What is wrong with the parsed ``tree`` (the first problem in reading order) and its reason, or
    None; ``strings``: look for lone surrogates in keys and strings too."""
    pending = [(tree, (), 1)]
    while pending:
        value, path, depth = pending.pop()
        if isinstance(value, _Repeated):
            return f"sets {_shown((*path, value.key))} twice: keep one", "repeated_key"
        if isinstance(value, _Unreadable):
            return f"{_shown(path)} is {value.text}, {value.why}", value.reason
        name = path[-1] if path else ""  # the key (or index) it is held under
        if strings and any(isinstance(text, str) and SURROGATE.search(text) for text in (name, value)):
            why = "holds a \\u escape of half a UTF-16 surrogate pair, which is not text"
            return f"{_shown(path)} {why}", "lone_surrogate"
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep", "nested_too_deeply"
            children = value.items() if isinstance(value, dict) else enumerate(value)
            pending.extend(
                (child, (*path, str(key)), depth + 1)
                for key, child in reversed(list(children))
                if strings or isinstance(child, dict | list | _Unreadable)  # a plain scalar is fine
            )
    return None


def parse_json_value(data: bytes | bytearray | str, finite: bool = True) -> object:
    """The JSON value ``data`` holds (UTF-8 bytes, or text); :class:`JsonRefused` (a ValueError) with
    one line saying what is wrong: not UTF-8, not JSON, a repeated key, a number that is not finite or
    not readable, nesting past :data:`MAX_DEPTH`, a lone surrogate. ``finite=False`` reads NaN and
    Infinity (ds-sft's own metrics log writes a skipped step's loss as NaN). A ``bytearray`` is
    emptied once decoded, so that a large file's bytes are not held beside its text and its value."""
    if isinstance(data, bytes | bytearray):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise NotJson(
                f"not UTF-8 ({err.reason} at byte {err.start}): save it as UTF-8", "non_utf8", line
            ) from None
        if isinstance(data, bytearray):
            data.clear()
    else:
        text = data
    hooks = _Hooks(finite)
    try:
        tree = json.loads(
            text, object_pairs_hook=hooks.object, parse_float=hooks.float, parse_int=hooks.int,
            parse_constant=hooks.constant,
        )  # fmt: skip
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}" if "\n" in text.strip() else f"column {err.colno}"
        raise NotJson(f"not valid JSON ({err.msg} at {where})", "malformed_json", err.lineno) from None
    except RecursionError:
        raise JsonRefused(f"nested more than {MAX_DEPTH} levels deep", "nested_too_deeply") from None
    strings = _may_hold_lone_surrogate(text)
    if hooks.marked or strings or text.count("{") + text.count("[") > MAX_DEPTH:
        problem = _first_problem(tree, strings)
        if problem:
            raise JsonRefused(*problem)
    return tree


def parse_json_object(data: bytes | bytearray | str, finite: bool = True) -> dict:
    """The JSON object ``data`` holds (:func:`parse_json_value`); a top level that is not an object is
    refused too (``not_an_object``)."""
    tree = parse_json_value(data, finite)
    if not isinstance(tree, dict):
        raise JsonRefused(f"holds {json_kind(tree)}, not an object", "not_an_object")
    return tree
