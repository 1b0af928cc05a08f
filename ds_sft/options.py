"""The domain of every number, choice and name a user can pass, declared once and checked in one place.

Each option declares its domain (``Int(1, 2**31 - 1)``, ``Float(0, 1)``, ``Choice("off", "auto")``)
and the same object checks it wherever the value comes from:

* as argparse's ``type=``: ``--max_examples -5`` stops in the parser, one line, exit 2
  (``ds-sft prepare: error: argument --max_examples: must be an integer from 1 to ...``);
* anywhere else (a key of ``ds-sft train``'s DeepSpeed config, a field of a model's config, a task
  config of the harness, an argument of ``generate``): :func:`checked` returns the value or raises a
  :class:`~ds_sft.errors.UserError` of one line in the same words, ``NAME must be ..., got ...``.

A domain is the set of values the program can actually run with, not a style rule: the bounds are
where a value stops making sense (a threshold outside [0, 1]), where a later library rejects it with a
traceback (AdamW's ``eps <= 0``) or where it overflows (a seed above 2**63 - 1 in ``torch.manual_seed``).
NaN and infinity are outside every numeric domain.
"""

from __future__ import annotations

import argparse
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ds_sft.errors import UserError, one_line
from ds_sft.json_input import long_integer

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


class OutOfDomain(ValueError):
    """A value outside its option's domain; the message says what the domain is."""


def is_number(value) -> bool:
    """Whether ``value`` is an int or a float (a number read from JSON), not a bool (an int to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value) -> str:
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses past 4,300 digits
        return long_integer(decimal_digits(value))
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decimal_digits(value: int) -> int:
    """How many decimal digits ``value`` has, without ``str()`` (which refuses past 4,300): ``log10``
    from its bit length gives the count or one more, and one power of ten tells which."""
    magnitude = abs(value)
    upper = int(magnitude.bit_length() * math.log10(2)) + 1
    return upper if magnitude >= 10 ** (upper - 1) else max(upper - 1, 1)


def _bound(x) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:g}"
    x = int(x)
    if x < 0:
        magnitude = _bound(-x)
        return f"-({magnitude})" if "*" in magnitude else f"-{magnitude}"
    for power in (63, 31):
        if x == 2**power - 1:
            return f"2**{power}-1"
    return f"{x:,}"


class Domain:
    """A set of valid values: ``parse`` reads a command-line string, ``check`` validates a JSON value."""

    def parse(self, text: str):
        raise NotImplementedError

    def check(self, value):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def holds(self, value) -> bool:
        """Whether ``value`` (read from JSON) is in the domain: :meth:`check` without the message."""
        try:
            self.check(value)
        except OutOfDomain:
            return False
        return True

    def refuse(self, value) -> OutOfDomain:
        return OutOfDomain(f"must be {self.describe()}, got {_show(value)}")

    def __call__(self, text: str):
        """argparse ``type=``: the parsed value, or an ArgumentTypeError argparse prints in one line."""
        try:
            return self.check(self.parse(text))
        except OutOfDomain as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def __repr__(self) -> str:  # argparse names the type in some messages
        return self.describe()


@dataclass(frozen=True, repr=False)
class Int(Domain):
    """An integer in ``[min, max]`` (booleans and floats are not integers), a multiple of ``multiple``."""

    min: int = 0
    max: int = INT64_MAX
    multiple: int = 1

    def describe(self) -> str:
        kind = "an integer" if self.multiple == 1 else f"a multiple of {self.multiple}"
        return f"{kind} from {_bound(self.min)} to {_bound(self.max)}"

    def parse(self, text: str):
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise self.refuse(text) from None

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or not self.min <= value <= self.max:
            raise self.refuse(value)
        if value % self.multiple:
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Float(Domain):
    """A finite number in ``[min, max]``; ``min_open`` / ``max_open`` exclude the bound itself
    (a step size > 0, a momentum < 1)."""

    min: float = 0.0
    max: float = 1.0
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        low = f"> {_bound(self.min)}" if self.min_open else f">= {_bound(self.min)}"
        high = f"< {_bound(self.max)}" if self.max_open else f"<= {_bound(self.max)}"
        return f"a finite number {low} and {high}"

    def parse(self, text: str):
        try:
            return float(text)
        except ValueError:
            raise self.refuse(text) from None

    def check(self, value):
        ok = is_number(value)
        if ok:
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                raise self.refuse(value) from None
            ok = math.isfinite(number) and self.min <= number <= self.max
            ok = ok and not (self.min_open and number == self.min)
            ok = ok and not (self.max_open and number == self.max)
        if not ok:
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Choice(Domain):
    """One of a few named values."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", values)

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)

    def parse(self, text: str):
        return text

    def check(self, value):
        if isinstance(value, bool) or value not in self.values:
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Device(Domain):
    """A device ds-sft runs on: ``cpu``, ``cuda`` (the current GPU) or ``cuda:N``. Whether this machine
    has it is checked when the command starts (``ds_sft.eval.cli.available_device``); torch's own
    parser takes a dozen other types (``mps``, ``xla``, ``meta``) and answers each with a traceback."""

    def describe(self) -> str:
        return "cpu, cuda or cuda:N"

    def parse(self, text: str):
        return text.strip()

    def check(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:[0-9]{1,4})?", value):
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Names(Domain):
    """Some of a few named values: ``a,b`` on the command line (a repeated flag adds more), a list of
    names in JSON. The value is the list of names, each once, in the order given."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", values)

    def describe(self) -> str:
        return "names separated by commas, each one of " + ", ".join(map(str, self.values))

    def parse(self, text: str):
        return [name.strip() for name in text.split(",") if name.strip()]

    def check(self, value):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.refuse(value)
        unknown = [name for name in value if name not in self.values]
        if unknown:
            raise OutOfDomain(f"must be {self.describe()}, got {_show(unknown[0])}")
        return list(dict.fromkeys(value))


@dataclass(frozen=True, repr=False)
class Text(Domain):
    """A non-empty string without control characters (a path or a name: whether it exists is checked
    where it is used; no path can hold a NUL, and ds-sft prints the others in its lines: see
    :func:`control_character`). ``forbidden`` characters and ``max_length`` narrow it for a name
    another library checks only later (wandb refuses a project name with ``/`` when the run starts,
    after the model has loaded)."""

    forbidden: str = ""
    max_length: int | None = None

    def describe(self) -> str:
        text = "a non-empty string without control characters"
        if self.forbidden:
            text += " or any of " + " ".join(self.forbidden)
        if self.max_length is not None:
            text += f", at most {self.max_length} characters"
        return text

    def parse(self, text: str):
        return text

    def check(self, value):
        if not isinstance(value, str) or not value.strip() or control_character(value) is not None:
            raise self.refuse(value)
        if any(char in value for char in self.forbidden):
            raise self.refuse(value)
        if self.max_length is not None and len(value) > self.max_length:
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Bool(Domain):
    """true or false (JSON only: on the command line a switch is a flag without a value)."""

    def describe(self) -> str:
        return "true or false"

    def parse(self, text: str):
        return {"true": True, "false": False}.get(text.strip().lower(), text)

    def check(self, value):
        if not isinstance(value, bool):
            raise self.refuse(value)
        return value


@dataclass(frozen=True, repr=False)
class Each(Domain):
    """Several values in one, each in ``item``'s domain. A subclass says how :meth:`parts` splits a
    value into (label, part) pairs (raising :class:`OutOfDomain` when it cannot) and how
    :meth:`value_of` reads a part; a part outside the domain refuses the whole value, by its label
    when it has one."""

    item: Domain

    def parts(self, value) -> Iterable[tuple[str | None, object]]:
        raise NotImplementedError

    def value_of(self, part):
        return part

    def check(self, value):
        for label, part in self.parts(value):
            try:
                self.item.check(self.value_of(part))
            except OutOfDomain as err:
                raise (OutOfDomain(f"{label}: {err}") if label else self.refuse(value)) from None
        return value


@dataclass(frozen=True, repr=False)
class Pair(Each):
    """Two values of one domain, e.g. AdamW's betas ``[0.9, 0.95]``."""

    def describe(self) -> str:
        return f"two values, each {self.item.describe()}"

    def parse(self, text: str):
        return [self.item.parse(part) for part in text.split(",")]

    def parts(self, value):
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise self.refuse(value)
        return [(None, item) for item in value]


@dataclass(frozen=True, repr=False)
class Weights(Each):
    """``NAME=W,NAME=W`` with each weight in ``item``'s domain (the names are checked by the command)."""

    def describe(self) -> str:
        return f"NAME=WEIGHT pairs separated by commas, each weight {self.item.describe()}"

    def parse(self, text: str):
        return text

    def parts(self, value):
        if not isinstance(value, str):
            raise self.refuse(value)
        return self._pairs(value)

    def _pairs(self, value: str):  # lazily: a pair is refused in order, after the weights before it
        for pair in filter(None, value.split(",")):
            name, eq, weight = pair.partition("=")
            if not eq or not name.strip():
                raise self.refuse(value)
            yield name.strip(), weight

    def value_of(self, part):
        return self.item.parse(part)


def checked(name: str, value, domain: Domain):
    """``value`` when it lies in ``domain``, else one :class:`~ds_sft.errors.UserError` line naming it:
    ``NAME must be <the domain>, got <value>``. Every check of a number, switch or choice that argparse
    does not make goes through here, so each says the same thing in the same words as its flag."""
    try:
        return domain.check(value)
    except OutOfDomain as err:
        raise UserError(f"{name} {err}") from None


# Domains several commands and the benchmark scripts share.
SEED = Int(0, 2**32 - 1)  # torch, numpy and random all take it, and it fits any int64 tensor
THREADS = Int(1, 4096)  # torch.set_num_threads
COUNT = Int(1, INT32_MAX)  # how many of something: steps, repeats, problems
REPETITION_PENALTY = Float(0, 100, min_open=True)  # eval's flag and generate(): 1.0 is off


class StoreOnce(argparse._StoreAction):
    """``action=StoreOnce``: a flag naming an input (data, a model, a tokenizer, a config), given at
    most once (or twice with one value). argparse keeps the last of two values: ``--alpaca a.json
    --alpaca b.json`` read b.json alone, and a.json's rows were lost without a word; ``train
    --data_dir a --data_dir b`` trained on b. Settings and output folders keep argparse's rule (a
    later flag overrides: ``make demo DEMO_ARGS='--out runs/demo2'`` relies on it)."""


@dataclass(frozen=True)
class Ignored:
    """``flag`` does nothing when ``when(args)`` holds; ``because`` says why and what to do (``"with
    --no_val, which skips the val pass: drop one of the two"``).

    ``ds-sft eval --no_val --val_rows 5`` measured no val rows without a word, and the user took the
    report for the 5-row eval asked for. Each such pair is declared once beside the flags
    (:func:`refuse_ignored`) and refused by :class:`OneLineParser`, in one line, exit 2, when the flag
    was given on the command line (its default is never an objection)."""

    flag: str
    when: Callable[[argparse.Namespace], bool]
    because: str


def refuse_ignored(parser: argparse.ArgumentParser, *rules: Ignored) -> None:
    """Declare ``rules`` for ``parser`` (checked when it is a :class:`OneLineParser`, as every
    command line's is). A rule naming a flag the parser lacks is a bug, caught here."""
    known = parser._option_string_actions
    for rule in rules:
        if rule.flag not in known:
            raise ValueError(f"{rule.flag} is not a flag of {parser.prog}")
    parser.ignored_rules = (*getattr(parser, "ignored_rules", ()), *rules)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every flag's default: a help text that does not say its default gets
    ``(default: X)``, so no default is known only to the code (eval's --out runs/eval, --dtype
    bfloat16 were). Switches, and flags unset by default (None, an empty list: their help says what
    happens then), get none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # by identity: a default of 0 equals False, and is one to show
        unset = default is None or default is False or default is argparse.SUPPRESS or default in ([], ())
        if unset or not action.option_strings or "default" in text or action.nargs == 0:
            return text
        if isinstance(default, list | tuple):  # as it is typed: a,b,c (not Python's ['a', 'b', 'c'])
            return f"{text} (default: {','.join(map(str, default)).replace('%', '%%')})"
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad flag in one line, exit 2 (its subparsers do too).

    argparse prints its usage block first; a user who mistyped one number needs the one line that
    names the flag and its domain (``--help`` shows the usage).

    Flags are taken whole, never by a unique prefix (argparse's default): ``--base`` would mean
    ``--base_model`` until a release adds ``--baseline``, and a command in a script or a Slurm file
    would then change its meaning or stop working.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # subparsers are built by this class, so they inherit it
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # argparse quotes some values raw ("unrecognized arguments: ..."): one holding a newline or an
        # escape would forge a line of its own or drive the terminal
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._given: dict[str, list[str]] = {}  # dest -> the first value of each StoreOnce flag
        self._seen: set[str] = set()  # the dest of each flag given on the command line
        namespace, extras = super().parse_known_args(args, namespace)
        for rule in getattr(self, "ignored_rules", ()):
            if self._option_string_actions[rule.flag].dest in self._seen and rule.when(namespace):
                self.error(f"argument {rule.flag}: has no effect {rule.because}")
        return namespace, extras

    def _get_values(self, action, arg_strings):
        self._seen.add(action.dest)
        if isinstance(action, StoreOnce):
            first = self._given.setdefault(action.dest, arg_strings)
            if first is not arg_strings and first != arg_strings:
                self.error(
                    f"argument {action.option_strings[0]}: given twice ({' '.join(first)!r}, then "
                    f"{' '.join(arg_strings)!r}); it takes one value: pass it once"
                )
        # An empty value is far more often an unset shell variable (--output_dir "$OUT") than a choice,
        # and to a path flag "" means the working directory.
        if action.option_strings and any(not text.strip() for text in arg_strings):
            self.error(
                f"argument {action.option_strings[0]}: the value is empty (an unset shell variable?): "
                "pass a value, or leave the flag out"
            )
        # Bytes that are not UTF-8 (a Latin-1 name) reach Python as lone surrogates, which no UTF-8
        # file can hold: ds-sft records its paths and names in JSON and reports, so a run into
        # --out_dir $'caf\xe9' trained to its end and then failed writing its report, a traceback.
        undecodable = next((text for text in arg_strings if not text.isascii() and not _is_utf8(text)), None)
        if action.option_strings and undecodable is not None:
            self.error(
                f"argument {action.option_strings[0]}: {undecodable!r} is not UTF-8 (each \\udcXX is a byte "
                "that is not): ds-sft writes its paths and names into UTF-8 files; rename it, or pass another"
            )
        # A newline or an escape in a value (a folder's name) would forge or drive every line that
        # quotes it: a model's path heads its eval results and names it in notes
        controlled = next((text for text in arg_strings if control_character(text) is not None), None)
        if action.option_strings and controlled is not None:
            self.error(
                f"argument {action.option_strings[0]}: {controlled!r} holds a control character "
                f"({control_character(controlled)!r}), which would break the lines that quote it: "
                "rename it, or pass another"
            )
        return super()._get_values(action, arg_strings)


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (a C0 one, a newline or a tab among them, DEL or a C1
    one), or None. No flag value or config setting of ds-sft is text of several lines, and each may
    be quoted in a line ds-sft prints: a newline there starts a line that reads as ds-sft's own
    (``x\\nwarning: all good``), a carriage return overwrites it, an escape drives the terminal."""
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
