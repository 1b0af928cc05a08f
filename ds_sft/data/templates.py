"""How a record becomes the text a model sees: the prompt template, and the answer convention.

A record ``{instruction, input, response}`` is trained as ``prompt_ids + response_ids + [EOS]``:

- the **prompt** is :func:`render_prompt` (Alpaca-style, or the tokenizer's own chat template with
  the generation prompt of the assistant turn appended);
- the **answer** is the response text exactly as cleaned (for GSM8K: the reasoning, then the final
  ``#### N`` line), tokenized on its own, followed by the tokenizer's EOS token id. EOS is appended
  as an id, never as text, so it is trained even when the tokenizer's pad token is EOS.

Evaluation builds its prompts with the same :func:`render_prompt` (e.g. a GSM8K question is
``{"instruction": question, "input": ""}``) and generates until EOS.

A **conversation** (a ``messages`` row: optional system turn, then user/assistant turns, ending with
an assistant turn) trained on every assistant turn is :func:`conversation_segments`: one pair
(text not trained, assistant content) per assistant turn, trained as
``ids(text_1) + ids(content_1) + [EOS] + ids(text_2) + ids(content_2) + [EOS] ...``, so each
assistant turn follows the answer convention above and nothing else is ever trained:

- ``chat``: the tokenizer's template renders every prefix of the conversation that ends at an
  assistant turn, with the generation prompt (``P_k``) and with the turn itself (``F_k``). They must
  grow by appending: ``F_k`` starts with ``P_k + content_k``, and ``P_{k+1}`` starts with ``F_k``.
  ``text_k`` is what ``P_k`` adds to what came before; the template's end-of-turn text after a
  content is kept (untrained) except a leading EOS token text, which the EOS id replaces. This is
  the ``prefix`` route, taken wherever it holds: every trained answer follows exactly the text the
  template renders for that point of the conversation.
  A template that rewrites earlier turns once the conversation goes on (Qwen3's strips the reasoning
  of past answers and gives the final answer a ``<think>`` block, empty when it has none) breaks that
  chain; such a conversation takes the ``located`` route instead: the whole conversation is rendered
  once (what the model sees for the full chat) and each answer is located in it, in order, as the
  template shows it (the content up to whitespace, or for a past turn its answer after
  ``</think>``), followed by the template's turn end; the document is that render, the located
  answers and their EOS trained, the rest (markup such as an empty think block included) not. An
  answer that cannot be located (a template that rewrites the content itself) is refused in one
  line naming ``--train_on last`` (the final turn only) and ``--template alpaca``. The manifest
  counts, per source, the conversations each route masked (``turns_masked_by``).
- ``alpaca`` (tokenizers without a chat template): a plain-text transcript that extends the Alpaca
  prompt, so a one-turn conversation is exactly an Alpaca row::

      Below is an instruction that describes a task. Write a response that appropriately ...

      ### System:                  (only with a system turn)
      {system}

      ### Instruction:
      {user 1}

      ### Response:
      {assistant 1}<EOS>

      ### Instruction:
      {user 2}

      ### Response:
      {assistant 2}<EOS>
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import threading
import time

from ds_sft.errors import UserError, first_line

TEMPLATES = ("alpaca", "chat", "auto")

# The Alpaca format (Stanford Alpaca's data convention), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = ALPACA_PREAMBLE + ALPACA_TURN
# The plain-text conversation transcript (module docstring): a system turn, and what follows an answer.
ALPACA_SYSTEM = "### System:\n{system}\n\n"
ALPACA_NEXT_TURN = "\n\n" + ALPACA_TURN


def resolve_template(name: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return "chat" if has_chat else "alpaca"
    if name == "chat" and not has_chat:
        raise UserError("--template chat: this tokenizer has no chat template; use --template alpaca")
    return name


def _user_turn(record: dict) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def render_prompt(record: dict, template: str, tokenizer=None) -> str:
    """The prompt text of ``record`` (keys ``instruction``, optional ``input`` and ``history``).

    ``template`` is ``alpaca`` or ``chat`` (resolve ``auto`` first with :func:`resolve_template`);
    ``chat`` needs the tokenizer whose chat template renders it.
    """
    if template == "chat":
        messages = [*(record.get("history") or []), {"role": "user", "content": _user_turn(record)}]
        return _render(tokenizer, messages, True, record.get("id", "a row"))
    if template != "alpaca":
        raise UserError(f"unknown template {template!r}; choose alpaca or chat")
    fmt, values = alpaca_fields(record)
    return fmt.format(**values)


def alpaca_fields(record: dict) -> tuple[str, dict[str, str]]:
    """The Alpaca format string that fits ``record`` and the values of its fields."""
    context = record.get("input") or ""
    if record.get("history"):  # earlier chat turns become a transcript in the input section
        transcript = "\n".join(
            f"{turn['role'].capitalize()}: {turn['content']}" for turn in record["history"]
        )
        context = f"{transcript}\n\n{context}".strip()
    if context:
        return ALPACA_PROMPT, {"instruction": record["instruction"], "input": context}
    return ALPACA_PROMPT_NO_INPUT, {"instruction": record["instruction"]}


def answer_ids(tokenizer, response: str) -> list[int]:
    """The trained answer: the response tokenized on its own, then EOS (as an id)."""
    return tokenizer.backend_tokenizer.encode(response, add_special_tokens=False).ids + [
        tokenizer.eos_token_id
    ]


def conversation(record: dict) -> list[dict]:
    """The whole chat of a ``messages`` record: its earlier turns, the user turn, the final answer."""
    return [
        *(record.get("history") or []),
        {"role": "user", "content": _user_turn(record)},
        {"role": "assistant", "content": record["response"]},
    ]


def conversation_segments(record: dict, template: str, tokenizer) -> tuple[list[tuple[str, str]], str]:
    """(text not trained, trained answer text) per assistant turn of ``record``, and the route that
    masked them (``prefix`` or ``located``; the alpaca transcript is ``prefix`` by construction); see
    the module docstring.

    The conversation is well formed (``ds_sft.data.sources`` checked it): an optional system turn,
    then user and assistant turns alternating, ending with an assistant turn.
    """
    messages = conversation(record)
    if template == "alpaca":
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        first = ALPACA_PREAMBLE + (ALPACA_SYSTEM.format(system=system) if system is not None else "")
        texts = [first + ALPACA_TURN.format(instruction=users[0])]
        texts += [ALPACA_NEXT_TURN.format(instruction=user) for user in users[1:]]
        return list(zip(texts, answers, strict=True)), "prefix"
    if template != "chat":
        raise UserError(f"unknown template {template!r}; choose alpaca or chat")
    where = record.get("id", "a conversation")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def prompt(i: int) -> str:
        """P_k, the render up to assistant message ``i`` with the generation prompt. Rendered when
        needed, not all kept: each is about as long as the conversation up to it, so k of them held
        together took k times its size (400 turns of 50 kB: 5.4 GB for a 26 MB row)."""
        return _render(tokenizer, messages[:i], True, where)

    segments, problem = _prefix_segments(messages, answers, prompt, tokenizer, where)
    if segments is not None:
        return segments, "prefix"
    segments, located_problem = _located_segments(messages, answers, prompt, tokenizer, where)
    if segments is not None:
        return segments, "located"
    raise UserError(
        f"{where}: the chat template {problem}, and {located_problem}, so the turns cannot be masked "
        "by construction; pass --train_on last (final turn only) or --template alpaca"
    )


# A chat template is a program, and a broken or hostile one can run for hours without writing a
# character (``{% for i in range(100000) %}`` nested twice) or build strings of gigabytes (``{% set s
# = s ~ s %}`` in a loop; ``{{ 'a' * 3000000000 }}``, which Jinja computes when it compiles). One
# render may take this long and grow the process by this much; a real template takes well under a
# millisecond and a few kilobytes per conversation, and writes no constant near this size.
TEMPLATE_SECONDS = 10.0
TEMPLATE_GROWTH_BYTES = 1 << 30
TEMPLATE_CONSTANT_SIZE = 1 << 20  # characters, items or digits of a constant expression
# Filters and str methods whose numeric argument is the width of the text they build.
WIDTH_CALLS = ("center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap")


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
    """What a render stopped by the watchdog spent, for a one-line error."""
    if isinstance(err, TemplateOverTime):
        return f"ran over {TEMPLATE_SECONDS:g} s"
    return f"grew the process by over {TEMPLATE_GROWTH_BYTES >> 20:,} MiB"


@functools.lru_cache(maxsize=16)
def _oversized_constant(template: str) -> str | None:
    """The first constant expression of ``template`` whose value would exceed
    :data:`TEMPLATE_CONSTANT_SIZE` (Jinja folds constants when it compiles: ``'a' * 3000000000`` is
    built before any render can be stopped), as source-like text, or None. A name ``{% set %}`` to a
    constant counts as that constant: ``{% set n = 4000000000 %}{{ 'a' * n }}`` is one C call at
    render time, which neither watchdog can interrupt (4 GB before the render could be stopped)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes

    constants: dict[str, tuple[str, float]] = {}  # names set to constants: the largest value of each

    def size(node) -> tuple[str, float] | None:
        """("text", length) of a folded string or list, ("number", digits) of a number, or None."""
        if isinstance(node, nodes.Name):
            return constants.get(node.name)
        if isinstance(node, nodes.Const) and isinstance(node.value, str):
            return "text", len(node.value)
        if isinstance(node, nodes.Const) and isinstance(node.value, (int, float)):
            return "number", math.log10(abs(node.value) + 1) if abs(node.value) < 1e300 else 300.0
        if isinstance(node, (nodes.List, nodes.Tuple)):
            return "text", len(node.items)
        if not isinstance(node, (nodes.Mul, nodes.Add, nodes.Pow)):
            return None
        left, right = size(node.left), size(node.right)
        if left is None or right is None:
            return None
        (left_kind, left_size), (right_kind, right_size) = left, right
        if isinstance(node, nodes.Add):
            return left_kind, max(left_size, right_size) + (left_kind == right_kind == "text") * min(
                left_size, right_size
            )
        if isinstance(node, nodes.Mul) and "text" in (left_kind, right_kind):
            count = 10 ** min(right_size if left_kind == "text" else left_size, 12)
            return "text", (left_size if left_kind == "text" else right_size) * count
        if isinstance(node, nodes.Mul):
            return "number", left_size + right_size
        return "number", left_size * 10 ** min(right_size, 12)  # digits of a power

    class Generation(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` block, parsed as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            return nodes.Scope(
                parser.parse_statements(("name:endgeneration",), drop_needle=True), lineno=lineno
            )

    try:  # parsed as transformers parses it, without compiling
        environment = jinja2.Environment(extensions=[Generation, "jinja2.ext.loopcontrols"])
        tree = environment.parse(template)
    except jinja2.TemplateSyntaxError:
        return None  # transformers reports it when it compiles
    assigned = [node for node in tree.find_all(nodes.Assign) if isinstance(node.target, nodes.Name)]
    for _ in range(len(assigned)):  # each pass resolves one more link of a chain of names
        for node in assigned:
            found = size(node.node)
            if found is not None and found[1] > constants.get(node.target.name, ("", -1.0))[1]:
                constants[node.target.name] = found
    for node in tree.find_all((nodes.Mul, nodes.Pow, nodes.Add)):
        if (size(node) or ("", 0))[1] > TEMPLATE_CONSTANT_SIZE:
            return f"{node.left!r} {node.operator} {node.right!r}"
    # a width is a count of characters: {{ 'x'|center(3000000000) }} is 3 GB in one C call
    for node in tree.find_all((nodes.Filter, nodes.Call)):
        name = node.name if isinstance(node, nodes.Filter) else getattr(node.node, "attr", None)
        for arg in node.args if name in WIDTH_CALLS else ():
            kind, digits = size(arg) or ("", 0.0)
            if kind == "number" and digits > math.log10(TEMPLATE_CONSTANT_SIZE):
                return f"{name}({arg!r})"
    return None


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    """The chat template's text for ``messages``, within the limits above."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    templates = tokenizer.chat_template
    for template in templates.values() if isinstance(templates, dict) else [templates]:
        constant = _oversized_constant(template) if isinstance(template, str) else None
        if constant:
            raise UserError(
                f"the chat template of {name} builds a constant of over {TEMPLATE_CONSTANT_SIZE:,} "
                f"characters or digits ({constant[:200]}); fix its chat_template (tokenizer_config.json) "
                "or pass --template alpaca"
            )
    try:
        with watched_render():
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
    except (TemplateOverTime, TemplateOverMemory) as err:
        raise UserError(
            f"{where}: the chat template of {name} {over_budget(err)} rendering one conversation (a "
            "runaway loop?); fix its chat_template (tokenizer_config.json) or pass --template alpaca"
        ) from None
    except Exception as err:  # a template's own raise_exception(), or any Jinja error
        raise UserError(
            f"{where}: the chat template refused the conversation ({first_line(err)}); "
            "fix the row, or pass --train_on last or --template alpaca"
        ) from None


def _prefix_segments(messages, answers, prompt_at, tokenizer, where) -> tuple[list | None, str | None]:
    """The ``prefix`` route: (segments, None), or (None, what breaks the chain of prefix renders)."""
    eos_text = tokenizer.eos_token
    segments = []
    previous_full, emitted = "", 0  # the last F_k, and how much of it the segments so far hold
    for turn, i in enumerate(answers, start=1):
        prompt, content = prompt_at(i), messages[i]["content"]
        full = _render(tokenizer, messages[: i + 1], False, where)
        if not prompt.startswith(previous_full):
            return None, f"renders the earlier turns differently once the conversation goes on (turn {turn})"
        if not full.startswith(prompt + content):
            return None, f"does not render assistant turn {turn} verbatim right after the generation prompt"
        segments.append((prompt[emitted:], content))
        end_of_turn = full[len(prompt) + len(content) :]
        emitted = len(prompt) + len(content) + (len(eos_text) if end_of_turn.startswith(eos_text) else 0)
        previous_full = full
    return segments, None


def _located_segments(messages, answers, prompt_at, tokenizer, where) -> tuple[list | None, str | None]:
    """The ``located`` route: (segments, None), or (None, why an answer cannot be located).

    The whole conversation ``W`` is rendered once. Each ``P_k`` must be a prefix of ``W`` (so the
    text before each answer is exactly the model's context at inference), and the turn end ``E`` is
    what the template writes after an answer (found by rendering the conversation with a probe as
    its final answer). Assistant turn ``k`` is then the leftmost span after ``P_k`` (and before
    ``P_{k+1}``; for the final turn, the end of ``W``) that is immediately followed by ``E`` and
    shows the content as given up to whitespace (the same non-space characters in order, any
    whitespace between them: trimmed, reflowed ``<think>`` blocks), or else the content's answer
    after its last ``</think>`` up to whitespace (templates that drop the reasoning of past turns).
    """
    eos_text = tokenizer.eos_token
    whole = _render(tokenizer, messages, False, where)
    # a probe answer no template rewrites (a private-use character the conversation does not hold:
    # no letters, whitespace or markup); what follows it is the turn end
    probe = next((chr(code) for code in range(0xE000, 0xF900) if chr(code) not in whole), None)
    if probe is None:
        return None, "the conversation holds every private-use character, so no probe answer is free"
    probed = _render(tokenizer, [*messages[:-1], {"role": "assistant", "content": probe}], False, where)
    if probed.count(probe) != 1:
        return None, "it does not show a probe answer once as given"
    end_of_turn = probed[probed.index(probe) + 1 :]
    segments, emitted = [], 0
    following = prompt_at(answers[0])  # P_k and P_{k+1} at a time
    for turn, i in enumerate(answers, start=1):
        final = turn == len(answers)
        prompt, following = following, None if final else prompt_at(answers[turn])
        if not whole.startswith(prompt) or len(prompt) < emitted:
            return None, f"the whole conversation does not start with its render up to assistant turn {turn}"
        content = messages[i]["content"]
        forms = [content] + ([content.rsplit("</think>", 1)[-1]] if "</think>" in content else [])
        limit = len(whole) if final else len(following)
        for form in forms:
            shown = r"\s*".join(re.escape(char) for char in form if not char.isspace())
            pattern = f"({shown}){re.escape(end_of_turn)}" + (r"\Z" if final else "")
            found = re.compile(pattern).search(whole, len(prompt), limit)
            if found:
                break
        else:
            return None, f"assistant turn {turn}'s content is not in the whole render before its turn end"
        start, end = found.span(1)
        segments.append((whole[emitted:start], whole[start:end]))
        emitted = end + (len(eos_text) if whole.startswith(eos_text, end) else 0)
    return segments, None
