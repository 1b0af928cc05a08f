"""JSON a user hands ds-sft (a DeepSpeed config, a model's config.json, a manifest): one reader.

Python's ``json`` module takes more than JSON interchange can carry, and each extra is a later
surprise: a repeated key keeps its last value (other readers keep the first, so a recipe that says
two things says neither); ``NaN``, ``Infinity`` and ``1e400`` (read as inf) are floats that DeepSpeed,
torch and every strict reader refuse; an integer of more digits than ``int()`` converts is a
ValueError that names a Python setting; and a value nested hundreds deep reads, then breaks the first
recursive walk of it (``copy.deepcopy``, DeepSpeed's config reader) with a RecursionError.
:func:`parse_json_object` refuses each of these, and a top level that is not an object, with one
line naming the key (``"optimizer.params.eps" is NaN, not a finite number``). The file is named by
the caller: :func:`ds_sft.safe_read.read_json_object`.
"""

from __future__ import annotations

import json
import math

# Deeper than any config (HF's config.json nests 3 levels), and far below the interpreter's recursion
# limit, so that every walk of an accepted value (deepcopy, DeepSpeed's reader) has room to recurse.
MAX_DEPTH = 100


JSON_KINDS = {list: "a JSON list", str: "a JSON string", bool: "JSON true or false", type(None): "JSON null"}


class JsonRefused(ValueError):
    """Why a text is not a JSON object ds-sft reads: one line, without the file's name."""


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

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


def _object(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return _Repeated(pairs, key)
        seen.add(key)
    return dict(pairs)


def _float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _Unreadable(text, "not a finite number")


def _int(text: str):
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.set_int_max_str_digits)
        return _Unreadable(f"{text[:12]}...", f"an integer of {len(text.lstrip('-')):,} digits")


def _constant(text: str):  # NaN, Infinity, -Infinity
    return _Unreadable(text, "not a finite number")


def _first_problem(tree) -> str | None:
    """What is wrong with the parsed ``tree`` (the first problem in reading order), or None."""
    pending = [(tree, (), 1)]
    while pending:
        value, path, depth = pending.pop()
        if isinstance(value, _Repeated):
            return f'sets "{".".join((*path, value.key))}" twice: keep one'
        if isinstance(value, _Unreadable):
            where = f'"{".".join(path)}"' if path else "the top level"
            return f"{where} is {value.text}, {value.why}"
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            children = value.items() if isinstance(value, dict) else enumerate(value)
            pending.extend((child, (*path, str(key)), depth + 1) for key, child in reversed(list(children)))
    return None


def parse_json_object(data: bytes | str) -> dict:
    """The JSON object ``data`` holds (UTF-8 bytes, or text); :class:`JsonRefused` (a ValueError) with
    one line saying what is wrong: not UTF-8, not JSON, a repeated key, a number that is not finite or
    not readable, nesting past :data:`MAX_DEPTH`, a top level that is not an object."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise NotJson(f"not UTF-8 ({err.reason} at byte {err.start}): save it as UTF-8") from None
    try:
        tree = json.loads(
            data, object_pairs_hook=_object, parse_float=_float, parse_int=_int, parse_constant=_constant
        )
    except json.JSONDecodeError as err:
        raise NotJson(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise JsonRefused(f"nested more than {MAX_DEPTH} levels deep") from None
    problem = _first_problem(tree)
    if problem:
        raise JsonRefused(problem)
    if not isinstance(tree, dict):
        raise JsonRefused(f"holds {JSON_KINDS.get(type(tree), 'a JSON number')}, not an object")
    return tree
