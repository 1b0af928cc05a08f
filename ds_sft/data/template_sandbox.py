"""Jinja templates rendered within bounds: chat templates (a tokenizer's, run by ``prepare`` and
``eval``) and task templates (``eval --harness``).

A template is a program from someone else. Jinja's immutable sandbox keeps it away from Python, and
two more bounds keep it from taking the machine:

- sizes, checked BEFORE a value is built (:class:`BoundedSandbox`): ``*`` and ``**`` of strings,
  lists and numbers, ``+`` and ``~`` concatenation, printf and ``str.format`` widths and precisions,
  the filters and ``str`` (and ``bytes``) methods that pad, indent, wrap, join, batch, slice, sum or
  indent JSON, ``range``, ``lipsum`` and ``dict``. One such operation is a single C call: ``{{ 'x' *
  (messages|length * 4000000000) }}``
  built 4 GB, twice, before anything could stop it. An operation may build
  :data:`TEMPLATE_VALUE_SIZE` characters or items plus :data:`TEMPLATE_INPUT_FACTOR` times what the
  render was given (a real template builds about its conversation), a number
  :data:`TEMPLATE_NUMBER_BITS` bits;
- time and memory, watched while a render runs (:func:`watched_render`): loops build nothing large
  yet run for hours, or grow a value step by step.

:func:`render_chat` renders a tokenizer's chat template as ``tokenizer.apply_chat_template(...,
tokenize=False)`` does (same environment options, globals, filters and variables), in the bounded
sandbox.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import functools
import os
import re
import string
import sys
import threading
import time

# A chat template is a program, and a broken or hostile one can run for hours without writing a
# character (``{% for i in range(100000) %}`` nested twice) or build strings of gigabytes (``{% set s
# = s ~ s %}`` in a loop; ``{{ 'a' * 3000000000 }}``, which Jinja computes when it compiles). One
# render may take this long and grow the process by this much; a real template takes well under a
# millisecond and a few kilobytes per conversation, and writes no constant near this size.
TEMPLATE_SECONDS = 10.0
TEMPLATE_GROWTH_BYTES = 1 << 30


class TemplateOverTime(Exception):
    """A chat template ran past :data:`TEMPLATE_SECONDS` in one render."""


class TemplateOverMemory(Exception):
    """The process grew by over :data:`TEMPLATE_GROWTH_BYTES` during one render."""


class _Watchdog:
    """Stops renders that run too long or grow the process too much, from one daemon thread that looks
    ten times a second, by raising :class:`TemplateOverTime` or :class:`TemplateOverMemory` inside the
    rendering thread (``PyThreadState_SetAsyncExc``: delivered at the thread's next bytecode, so a
    template's Python loops stop; one long C call, such as joining two huge strings, finishes first).
    A render costs two dict updates under a lock; only the watchdog reads the process's memory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.renders: dict[int, tuple[int, float]] = {}  # thread id -> (render number, deadline)
        self.count = 0
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="chat-template-watchdog", daemon=True)
                self.thread.start()
            self.count += 1
            self.renders[threading.get_ident()] = (self.count, time.monotonic() + TEMPLATE_SECONDS)

    def stop(self) -> None:
        with self.lock:
            fired = self.renders.pop(threading.get_ident(), None) is None
        if fired:  # the render ended as it was stopped: the exception is not delivered after it
            _async_raise(threading.get_ident(), None)

    def _watch(self) -> None:
        seen: dict[int, tuple[int, int]] = {}  # thread id -> (render number, RSS when first seen)
        while True:
            time.sleep(0.1)
            resident = _resident_bytes()
            with self.lock:
                now = time.monotonic()
                for ident, (number, deadline) in list(self.renders.items()):
                    if seen.get(ident, (None,))[0] != number:  # a render not seen before
                        seen[ident] = (number, resident)
                    stop = TemplateOverTime if deadline < now else None
                    if resident - seen[ident][1] > TEMPLATE_GROWTH_BYTES:
                        stop = TemplateOverMemory
                    if stop is not None:
                        del self.renders[ident]
                        _async_raise(ident, stop)


def _resident_bytes() -> int:
    """The process's resident memory now (Linux), or its peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _async_raise(ident: int, exc: type | None) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


_watchdog = _Watchdog()


@contextlib.contextmanager
def watched_render():
    """Run one template render under the watchdog: :class:`TemplateOverTime` or
    :class:`TemplateOverMemory` is raised inside it when it runs too long or grows too much."""
    _watchdog.start()
    try:
        yield
    finally:
        _watchdog.stop()


def over_budget(err: Exception) -> str:
    """What a render stopped by the watchdog would spend, or what a size check refused, for a
    one-line error."""
    if isinstance(err, TemplateOverSize):
        return str(err)
    if isinstance(err, TemplateOverTime):
        return f"ran over {TEMPLATE_SECONDS:g} s"
    return f"grew the process by over {TEMPLATE_GROWTH_BYTES >> 20:,} MiB"


class TemplateOverSize(Exception):
    """A template operation would build a value over the render's size limit; raised before it is built."""


# What one template operation may build. A real chat template builds about its conversation (the
# whole render, joined), a task template about its document; a few kilobytes of markup around them.
TEMPLATE_VALUE_SIZE = 1 << 20  # characters or items, beyond TEMPLATE_INPUT_FACTOR x the render's input
TEMPLATE_INPUT_FACTOR = 4
TEMPLATE_NUMBER_BITS = 1 << 16  # bits of a number (about 20,000 digits)
JINJA_MAX_RANGE = 100_000  # the largest range Jinja's sandbox lets a template make
PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")

_value_limit = contextvars.ContextVar("template_value_limit", default=TEMPLATE_VALUE_SIZE)


def _refuse(what: str):
    raise TemplateOverSize(f"would build over {_value_limit.get():,} characters or items ({what:.200})")


def _check(size: int, what: str) -> None:
    if size > _value_limit.get():
        _refuse(what)


def _weight(value, memo: dict | None = None) -> int:
    """Characters or items ``value`` stands for written out: a string its length, a container its
    items plus theirs, a container held several times counted each time (``[[x] * 1000] * 1000``
    writes a million items), without walking it more than once; anything else 1."""
    memo = {} if memo is None else memo
    if isinstance(value, str | bytes):  # bytes: 'x'.encode() repeats and pads as a string does
        return len(value)
    if not isinstance(value, list | tuple | dict):
        return 1
    if id(value) not in memo:
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = len(items) + sum(_weight(item, memo) for item in items)
    return memo[id(value)]


def _check_printf(text, arguments, what: str) -> None:
    """``text % arguments``: the widths and precisions of its conversions (``'%999999999d' % 1``),
    and what its conversions write (``('%(a)s' * 300000) % {'a': s}`` writes ``s`` 300,000 times)."""
    if not isinstance(text, str):
        return
    conversions = PRINTF_SPEC.findall(text)
    for number in (n for spec in conversions for n in spec if n):
        if number == "*":
            _refuse(f"a {what} width taken from an argument (%*)")
        _check(int(number), f"a {what} width of {number}")
    values = arguments if isinstance(arguments, tuple) else (arguments,)
    if isinstance(arguments, dict):  # %(name)s conversions
        values = tuple(arguments.values())
    _check_fields(text, len(conversions), values, what)


def _check_format(text: str, args: tuple, kwargs: dict) -> None:
    """``text.format(*args, **kwargs)``: the widths and precisions of its fields (``'{:>999999999}'``)
    and what its fields write."""
    try:
        fields = [spec for _, name, spec, _ in string.Formatter().parse(text) if name is not None]
    except ValueError:
        return  # str.format itself reports it
    for spec in fields:
        if "{" in spec:
            _refuse("a format width taken from an argument ({:{}})")
        for number in re.findall(r"\d+", spec):
            _check(int(number), f"a format width of {number}")
    _check_fields(text, len(fields), (*args, *kwargs.values()), "str.format")


def _check_fields(text: str, fields: int, values: tuple, what: str) -> None:
    """A format string writes at most its own text and, per field, its largest argument."""
    largest = max((_weight(value) for value in values), default=0)
    _check(len(text) + fields * largest, f"{what} of {fields} fields")


def _replaced_size(text: str, old: str, new: str, count=-1) -> int:
    found = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _check_binop(operator: str, left, right) -> None:
    """Refuses ``left operator right`` when the value it would build is over the limits."""

    def sequence(value) -> bool:
        return isinstance(value, str | bytes | list | tuple)

    if operator == "*" and isinstance(left, int) and isinstance(right, int):
        _check_bits(left.bit_length() + right.bit_length(), "a product")
    elif operator == "*" and (
        sequence(left) and isinstance(right, int) or isinstance(left, int) and sequence(right)
    ):
        items, count = (left, right) if isinstance(right, int) else (right, left)
        _check(_weight(items) * max(count, 0), f"{type(items).__name__} * {count}")
    elif (
        operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
    ):
        _check_bits(right * left.bit_length(), f"a power ** {right}")
    elif operator == "+" and sequence(left) and sequence(right):
        _check(_weight(left) + _weight(right), f"{type(left).__name__} + {type(right).__name__}")
    elif operator == "%":
        _check_printf(left, right, "printf")


def _check_bits(bits: int, what: str) -> None:
    if bits > TEMPLATE_NUMBER_BITS:
        raise TemplateOverSize(f"would build a number of over {TEMPLATE_NUMBER_BITS:,} bits ({what})")


def _materialized(value):
    """``value`` as a list when it is a lazy iterable (``map``, ``select``), so that it can be sized."""
    return (
        value
        if isinstance(value, str | list | tuple | dict) or not hasattr(value, "__iter__")
        else list(value)
    )


def _filter_size(name: str, value, arguments: dict) -> int:
    """The size of what filter ``name`` would build from ``value`` and its bound ``arguments``."""
    text = str(value) if name in ("center", "indent", "wordwrap", "replace", "format") else ""
    if name == "center":
        return len(text) + max(arguments.get("width", 80), 0)
    if name == "indent":
        width = arguments.get("width", 4)
        return len(text) + (text.count("\n") + 1) * (len(width) if isinstance(width, str) else max(width, 0))
    if name == "wordwrap":
        return len(text) * (1 + len(arguments.get("wrapstring") or "\n"))
    if name == "replace":
        return _replaced_size(
            text, str(arguments["old"]), str(arguments["new"]), arguments.get("count") or -1
        )
    if name == "format":
        _check_printf(text, arguments.get("kwargs") or tuple(arguments.get("args", ())), "format")
        return len(text)
    if name == "join":
        items = _materialized(value)
        return _weight(items) + len(items) * len(str(arguments.get("d", "")))
    if name == "batch":
        return max(arguments["linecount"], 0) if arguments.get("fill_with") is not None else 0
    if name == "slice":  # one list per slice, however few items: 'x'|slice(10**8) made 10**8 lists
        slices = arguments["slices"]
        return (max(slices, 0) if isinstance(slices, int) else 0) + len(_materialized(value))
    if name == "sum":
        return sum(_weight(item) for item in _materialized(value) if not isinstance(item, int | float))
    if name == "tojson":
        indent = arguments.get("indent")
        return _weight(value) * (1 + (len(indent) if isinstance(indent, str) else max(indent or 0, 0)))
    raise AssertionError(name)


SIZED_FILTERS = (
    "center",
    "indent",
    "wordwrap",
    "replace",
    "format",
    "join",
    "batch",
    "slice",
    "sum",
    "tojson",
)
WIDTH_METHODS = ("center", "ljust", "rjust", "zfill")  # str methods whose first argument is a width


def _sized_filter(name: str, function):
    """``function`` (a Jinja filter) sizing what it would build before it builds it."""
    import inspect

    signature = inspect.signature(function)
    passes = getattr(function, "jinja_pass_arg", None)  # an environment or context comes first
    # Jinja's async-ready filters (slice, map, ...) pass an eval context that the function they wrap,
    # whose signature this is, does not take: bind from the value on, or 'slices' binds the value.
    signature_skips = 1 if passes and not getattr(inspect.unwrap(function), "jinja_pass_arg", None) else 0

    @functools.wraps(function)
    def sized(*args, **kwargs):
        args = list(args)
        value_at = 1 if passes else 0
        if name in ("join", "sum", "slice") and len(args) > value_at:
            args[value_at] = _materialized(args[value_at])  # a generator is read once: size the list
        bound = signature.bind(*args[signature_skips:], **kwargs)
        arguments = dict(bound.arguments)
        value = args[value_at] if len(args) > value_at else None
        _check(_filter_size(name, value, arguments), f"the {name} filter of those arguments")
        return function(*args, **kwargs)

    return sized


@functools.cache
def bounded_sandbox_class():
    """``BoundedSandbox``: Jinja's immutable sandbox sizing what it builds before building it (made
    on first use, so that jinja2 is imported only when a template renders)."""
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.runtime import markup_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class SizedConcat(CodeGenerator):
        """Compiles ``a ~ b`` to a call of the environment's :meth:`sized_concat`, as the sandbox
        compiles the operators it intercepts to ``call_binop``."""

        @optimizeconst
        def visit_Concat(self, node, frame) -> None:
            self.write("environment.sized_concat(context, (")
            for argument in node.nodes:
                self.visit(argument, frame)
                self.write(", ")
            self.write("))")

    def _sized_output(pieces):
        written = 0
        for piece in pieces:
            written += len(piece)
            _check(written, "the rendered text")
            yield piece

    class BoundedTemplate(ImmutableSandboxedEnvironment.template_class):
        def render(self, *args, **kwargs):
            """The render, with its size limit set from what it is given, under the watchdog (the
            size checks miss loops: 10**10 steps build nothing large), its output sized as it grows."""
            variables = dict(*args, **kwargs)
            limit = TEMPLATE_VALUE_SIZE + TEMPLATE_INPUT_FACTOR * _weight(variables)
            token = _value_limit.set(limit)
            try:
                with watched_render():
                    context = self.new_context(variables)
                    try:
                        return self.environment.concat(_sized_output(self.root_render_func(context)))
                    except Exception:
                        self.environment.handle_exception()
            finally:
                _value_limit.reset(token)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """See the module docstring. The intercepted operators are not folded when a template
        compiles either (Jinja folds constants then: ``'a' * 3000000000`` was built by compiling)."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})
        template_class = BoundedTemplate
        code_generator_class = SizedConcat

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.filters.update(self.sized_filters(self.filters))
            self.globals["range"] = self.sized_range
            self.globals["lipsum"] = self.sized_lipsum

        @staticmethod
        def sized_filters(filters: dict) -> dict:
            """Those of ``filters`` that build large values, each sizing its result first."""
            return {name: _sized_filter(name, filters[name]) for name in SIZED_FILTERS if name in filters}

        @staticmethod
        def sized_range(*args):
            if len(range(*args)) > JINJA_MAX_RANGE:
                _refuse(f"range{args}")
            return range(*args)

        @staticmethod
        def sized_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (Jinja's names)
            """Jinja's ``lipsum``, its paragraphs times their most words sized first (``lipsum(10**6)``
            wrote words in a Python loop until the watchdog stopped it)."""
            from jinja2.utils import generate_lorem_ipsum

            sized = isinstance(n, int) and isinstance(max, int)
            _check(builtins.max(n, 0) * builtins.max(max, 1) if sized else 0, f"lipsum({n}, max={max})")
            return generate_lorem_ipsum(n=n, html=html, min=min, max=max)

        def sized_concat(self, context, pieces):
            texts = [str(piece) for piece in pieces]
            _check(sum(map(len, texts)), "a ~ concatenation")
            return markup_join(pieces) if context.eval_ctx.autoescape else "".join(texts)

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
            if isinstance(owner, str | bytes):
                args = (_materialized(args[0]), *args[1:]) if name == "join" and args else args
                _check(_method_size(owner, name, args), f"{type(owner).__name__}.{name} of those arguments")
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):  # str.format / format_map, which the sandbox wraps on access
            formatting = super().wrap_str_format(value)
            owner, name = getattr(value, "__self__", None), getattr(value, "__name__", "")
            if not isinstance(owner, str) or formatting is None:
                return formatting

            def sized(*args, **kwargs):
                mapping = args[0] if name == "format_map" and args and isinstance(args[0], dict) else {}
                _check_format(owner, () if name == "format_map" else args, {**mapping, **kwargs})
                return formatting(*args, **kwargs)

            return sized

    return BoundedSandbox


def _method_size(text: str | bytes, name: str, args) -> int:
    """The size of what ``text.name(*args)`` would build, for the ``str`` and ``bytes`` methods that
    can grow it."""
    numbers = [a for a in args if isinstance(a, int)]
    if name in WIDTH_METHODS and numbers:
        return len(text) + max(numbers[0], 0)
    if name == "expandtabs":
        return len(text) + text.count(b"\t" if isinstance(text, bytes) else "\t") * max(
            numbers[0] if numbers else 8, 0
        )
    if name == "replace" and len(args) >= 2 and all(isinstance(a, type(text)) for a in args[:2]):
        return _replaced_size(text, args[0], args[1], *args[2:3])
    if name == "join" and args:
        return _weight(args[0]) + len(args[0]) * len(text) if hasattr(args[0], "__len__") else 0
    if name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        return len(text) * longest
    return len(text)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``, rendered
    in the bounded sandbox: the template the tokenizer would choose, with the tokenizer's special
    tokens, ``messages`` (``{"role", "content"}`` dicts; keys set to None dropped, as transformers
    does), ``tools`` and ``documents`` None. Raises :class:`TemplateOverSize`,
    :class:`TemplateOverTime` or :class:`TemplateOverMemory`, or the template's own error."""
    template = tokenizer.get_chat_template()
    chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
    variables = {**tokenizer.special_tokens_map, "tools": None, "documents": None}
    return _chat_template(template).render(
        {**variables, "messages": chat, "add_generation_prompt": add_generation_prompt}
    )


@functools.lru_cache(maxsize=16)
def _chat_template(template: str):
    """``template`` compiled in a bounded sandbox set up as transformers sets up its own
    (``transformers.utils.chat_template_utils``): trim_blocks and lstrip_blocks, loop controls, the
    ``{% generation %}`` block (rendered as its body: no assistant mask is asked for), a ``tojson``
    that does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and a
    ``namespace`` that refuses underscore names."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def sized_dict(made: dict) -> dict:
        # dict.fromkeys(range(3000), mega) holds one string 3000 times for the cost of 3000 pointers;
        # written out ({{ d }}, d|string, d ~ '') it is 3 GB, built in one C call (16 s, 2.9 GB)
        _check(_weight(made), "a dict of those items")
        return made

    class TemplateDict:  # dict(...) and dict.fromkeys(...), nothing of the type itself
        def __call__(self, *args, **kwargs):
            return sized_dict(dict(*args, **kwargs))

        def fromkeys(self, *args, **kwargs):
            return sized_dict(dict.fromkeys(*args, **kwargs))

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # Jinja's signature trick: namespace(self=...) works
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template cannot set the namespace attribute {name!r}")

    environment = bounded_sandbox_class()(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    environment.filters.update(environment.sized_filters({"tojson": tojson}))
    environment.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda format: datetime.now().strftime(format),
        dict=TemplateDict(),
        namespace=TemplateNamespace,
    )
    return environment.from_string(template)
