"""How a record becomes the text a model sees: the prompt template, and the answer convention.

A record ``{instruction, input, response}`` is trained as ``prompt_ids + response_ids + [EOS]``:

- the **prompt** is :func:`render_prompt` (Alpaca-style, or the tokenizer's own chat template with
  the generation prompt of the assistant turn appended);
- the **answer** is the response text exactly as cleaned (for GSM8K: the reasoning, then the final
  ``#### N`` line), tokenized on its own, followed by the tokenizer's EOS token id. EOS is appended
  as an id, never as text, so it is trained even when the tokenizer's pad token is EOS.

Evaluation builds its prompts with the same :func:`render_prompt` (e.g. a GSM8K question is
``{"instruction": question, "input": ""}``) and generates until EOS.
"""

from __future__ import annotations

from ds_sft.errors import UserError

TEMPLATES = ("alpaca", "chat", "auto")

# The Alpaca format (Stanford Alpaca's data convention), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


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
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
