"""How a record becomes the text a model sees: the prompt template, and the answer convention.

A record ``{instruction, input, response}`` is trained as ``prompt_ids + response_ids + [EOS]``:

- the **prompt** is :func:`render_prompt` (Alpaca-style, or the tokenizer's own chat template with
  the generation prompt of the assistant turn appended);
- the **answer** is the response text exactly as cleaned (for GSM8K: the reasoning, then the final
  ``#### N`` line), tokenized on its own, followed by the tokenizer's EOS token id. EOS is appended
  as an id, never as text, so it is trained even when the tokenizer's pad token is EOS. Under a
  chat template whose turn ends with a special token other than EOS (Qwen2.5's ``<|im_end|>``,
  Llama 3's ``<|eot_id|>``) that token takes EOS's place (:func:`answer_end_id`), as the template
  renders it.

Evaluation builds its prompts with the same :func:`render_prompt` (e.g. a GSM8K question is
``{"instruction": question, "input": ""}``) and generates until EOS (or that end-of-turn token).

A **conversation** (a ``messages`` row: optional system turn, then user/assistant turns, ending with
an assistant turn) trained on every assistant turn is :func:`conversation_segments`: one pair
(text not trained, assistant content) per assistant turn, trained as
``ids(text_1) + ids(content_1) + [EOS] + ids(text_2) + ids(content_2) + [EOS] ...``, so each
assistant turn follows the answer convention above and nothing else is ever trained:

- ``chat``: the tokenizer's template renders every prefix of the conversation that ends at an
  assistant turn, with the generation prompt (``P_k``) and with the turn itself (``F_k``). They must
  grow by appending: ``F_k`` starts with ``P_k + content_k``, and ``P_{k+1}`` starts with ``F_k``.
  ``text_k`` is what ``P_k`` adds to what came before; the template's end-of-turn text after a
  content is kept (untrained) except a leading :func:`answer_end_id` text, which its id replaces. This is
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

from ds_sft.data.shown_text import find_shown
from ds_sft.data.template_sandbox import (
    TemplateOverMemory,
    TemplateOverSize,
    TemplateOverTime,
    over_budget,
    render_chat,
)
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
ALPACA_INSTRUCTION, ALPACA_RESPONSE = "### Instruction:\n", "### Response:\n"
ALPACA_TURN = ALPACA_INSTRUCTION + "{instruction}\n\n" + ALPACA_RESPONSE
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
        return render_messages(tokenizer, messages, True, record.get("id", "a row"))
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


def answer_ids(tokenizer, response: str, template: str = "alpaca") -> list[int]:
    """The trained answer: the response tokenized on its own as the prompt's continuation (no
    start-of-text mark, :func:`~ds_sft.data.tokenizer.continuation_backend`), then
    :func:`answer_end_id` (as an id)."""
    from ds_sft.data.tokenizer import continuation_backend

    following = continuation_backend(tokenizer.backend_tokenizer)
    return following.encode(response, add_special_tokens=False).ids + [answer_end_id(tokenizer, template)]


def alpaca_chat_template(start: str = "") -> str:
    """A Jinja chat template that renders messages as the Alpaca transcript above (the preamble, an
    optional system turn, ``### Instruction:`` / ``### Response:`` turns, EOS after each answer), so
    that a model fine-tuned on Alpaca-format data is prompted as it was trained where a chat template
    is asked for (``apply_chat_template``, serving stacks). ``start``: the text of what the tokenizer's
    post-processor puts first (a BOS), which the template writes as the prompt's first ids. A message
    holds one text, so a row's ``### Input:`` section has no place here: its input is part of the
    instruction."""
    import json

    def text(value: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(value)

    system_head, system_tail = ALPACA_SYSTEM.split("{system}")
    return (
        "{%- set ns = namespace(answered=false) -%}"
        f"{{{{ {text(start + ALPACA_PREAMBLE)} }}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        f"{{{{ {text(system_head)} + message['content'] + {text(system_tail)} }}}}"
        "{%- elif message['role'] == 'user' -%}"
        f"{{{{ ({text(chr(10) * 2)} if ns.answered else '') + {text(ALPACA_INSTRUCTION)} + message['content']"
        f" + {text(chr(10) * 2)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {text(ALPACA_RESPONSE)} + message['content'] + eos_token }}}}{{%- set ns.answered = true -%}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {text(ALPACA_RESPONSE)} }}}}{{%- endif -%}}"
    )


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template writes right after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...), as a list of at most one id: where a chat model ends its
    answer, whether or not the tokenizer's EOS is that token. Empty for a turn end in plain text."""
    marker = "\u2063answer\u2063"  # text no template rewrites
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    text = render_messages(tokenizer, messages, False, "the end-of-turn probe")
    if marker not in text:
        return []
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return after[:1] if after and after[0] in special else []


def answer_end_id(tokenizer, template: str) -> int:
    """The id that ends every trained answer, trained with it: under a chat template that ends an
    assistant turn with a special token (:func:`end_of_turn_ids`), that token, as the template renders
    it, so the document is the template's own text and the model learns to end its turn as chat
    inference expects (Qwen2.5's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, not their EOS). Otherwise
    (the Alpaca template, a turn end in plain text) the EOS id, added after the answer."""
    ends = end_of_turn_ids(tokenizer) if template == "chat" else []
    return ends[0] if ends else tokenizer.eos_token_id


def conversation(record: dict) -> list[dict]:
    """The whole chat of a ``messages`` record: its earlier turns, the user turn, the final answer."""
    return [
        *(record.get("history") or []),
        {"role": "user", "content": _user_turn(record)},
        {"role": "assistant", "content": record["response"]},
    ]


def conversation_segments(
    record: dict, template: str, tokenizer, end_id: int
) -> tuple[list[tuple[str, str]], str]:
    """(text not trained, trained answer text) per assistant turn of ``record``, and the route that
    masked them (``prefix`` or ``located``; the alpaca transcript is ``prefix`` by construction); see
    the module docstring. ``end_id`` is :func:`answer_end_id` of ``tokenizer`` and ``template``,
    found once by the caller for all its conversations: finding it renders the template.

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
    end_text = tokenizer.convert_ids_to_tokens(end_id)

    def prompt(i: int) -> str:
        """P_k, the render up to assistant message ``i`` with the generation prompt. Rendered when
        needed, not all kept: each is about as long as the conversation up to it, so k of them held
        together took k times its size (400 turns of 50 kB: 5.4 GB for a 26 MB row)."""
        return render_messages(tokenizer, messages[:i], True, where)

    segments, problem = _prefix_segments(messages, answers, prompt, tokenizer, where, end_text)
    if segments is not None:
        return segments, "prefix"
    segments, located_problem = _located_segments(messages, answers, prompt, tokenizer, where, end_text)
    if segments is not None:
        return segments, "located"
    raise UserError(
        f"{where}: the chat template {problem}, and {located_problem}, so the turns cannot be masked "
        "by construction; pass --train_on last (final turn only) or --template alpaca"
    )


def render_messages(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    """The chat template's text for ``messages``, rendered within the bounds of
    :mod:`ds_sft.data.template_sandbox` (sizes, time, memory); a refusal or error is one line naming
    ``where``."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    try:
        return render_chat(tokenizer, messages, generation_prompt)
    except (TemplateOverTime, TemplateOverMemory, TemplateOverSize) as err:
        raise UserError(
            f"{where}: the chat template of {name} {over_budget(err)} rendering one conversation; fix "
            "its chat_template (tokenizer_config.json) or pass --template alpaca"
        ) from None
    except Exception as err:  # a template's own raise_exception(), or any Jinja error
        raise UserError(
            f"{where}: the chat template refused the conversation ({first_line(err)}); "
            "fix the row, or pass --train_on last or --template alpaca"
        ) from None


def _prefix_segments(
    messages, answers, prompt_at, tokenizer, where, end_text
) -> tuple[list | None, str | None]:
    """The ``prefix`` route: (segments, None), or (None, what breaks the chain of prefix renders).
    ``end_text`` is the text of :func:`answer_end_id`, which stands for it where the turn end starts
    with it."""
    segments = []
    previous_full, emitted = "", 0  # the last F_k, and how much of it the segments so far hold
    for turn, i in enumerate(answers, start=1):
        prompt, content = prompt_at(i), messages[i]["content"]
        full = render_messages(tokenizer, messages[: i + 1], False, where)
        if not prompt.startswith(previous_full):
            return None, f"renders the earlier turns differently once the conversation goes on (turn {turn})"
        if not full.startswith(prompt + content):
            return None, f"does not render assistant turn {turn} verbatim right after the generation prompt"
        segments.append((prompt[emitted:], content))
        end_of_turn = full[len(prompt) + len(content) :]
        emitted = len(prompt) + len(content) + (len(end_text) if end_of_turn.startswith(end_text) else 0)
        previous_full = full
    return segments, None


def _located_segments(
    messages, answers, prompt_at, tokenizer, where, end_text
) -> tuple[list | None, str | None]:
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
    whole = render_messages(tokenizer, messages, False, where)
    # a probe answer no template rewrites (a private-use character the conversation does not hold:
    # no letters, whitespace or markup); what follows it is the turn end
    probe = next((chr(code) for code in range(0xE000, 0xF900) if chr(code) not in whole), None)
    if probe is None:
        return None, "the conversation holds every private-use character, so no probe answer is free"
    probed = render_messages(
        tokenizer, [*messages[:-1], {"role": "assistant", "content": probe}], False, where
    )
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
        spans = (find_shown(whole, form, end_of_turn, len(prompt), limit, final) for form in forms)
        found = next(filter(None, spans), None)
        if found is None:
            return None, f"assistant turn {turn}'s content is not in the whole render before its turn end"
        start, end = found
        segments.append((whole[emitted:start], whole[start:end]))
        emitted = end + (len(end_text) if whole.startswith(end_text, end) else 0)
    return segments, None
