"""Conversations: every assistant turn trained, and nothing else, whatever the chat template.

The reference is independent of ``conversation_segments``: for assistant turn ``k`` it renders the
conversation prefix ending at that turn's generation prompt (``P_k``) straight through the chat
template, and the document's tokens before the k-th trained run must decode to ``P_k`` (all the
system and user text so far), the run itself to exactly the answer + EOS. Templates: SmolLM2's own
(from the shared GGUF), and ChatML-like, Llama-3-like (headers, ``trim``) and default-system-prompt
ones written here as Jinja on the GPT-2 tokenizer, whose turn ends are or are not its EOS text.
Templates that rewrite turns (Qwen3's own, one that strips past reasoning, one that marks the final
answer) are checked against the whole render instead: the document is that render, and each trained
run is the answer as the template shows it (computed here from the template's own rules) + EOS,
after exactly ``P_k`` and the markup the template puts before that answer.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ds_sft.data.clean import Drops, normalize_text
from ds_sft.data.sources import SourceSpec, conversation_problem, to_records
from ds_sft.data.templates import ALPACA_PREAMBLE
from ds_sft.data.tokenize import ROUTES, tokenize_records
from ds_sft.errors import UserError
from tests.data.helpers import parse_prepare_args, write_jsonl

# --- chat templates written for the test ------------------------------------------------------------
CHATML = (  # end of turn "<|im_end|>" is plain text for GPT-2: EOS is added after each answer
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # headers, trimmed contents, BOS first, and the turn ends with the tokenizer's EOS text
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
DEFAULT_SYSTEM = (  # SmolLM2's shape: a system prompt of its own when the conversation has none
    "{% if messages[0]['role'] != 'system' %}{{ 'System: be kind.' + eos_token }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Reasoning of past answers is stripped once a later user turn exists (as Qwen3's template does):
# the earlier turns are rewritten, so the conversation has no single transcript.
STRIPS_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ m['role'] + ': ' + c + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
EOS = "<|endoftext|>"  # GPT-2's
# The final answer gets markup the earlier ones do not (as Qwen3's empty <think></think> block).
MARKS_FINAL_ANSWER = (
    "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<think></think>' }}{% endif %}{{ m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Qwen3's own chat template (Qwen/Qwen3-0.6B's, tools left out): answers before the last user query
# lose their reasoning, the answer after it gets a <think> block (an empty one when it has none).
QWEN3 = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not"
    "(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Rewrites the answers themselves: no route can find them, so it is refused.
UPPERCASES_ANSWERS = (
    "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "default_system": DEFAULT_SYSTEM}
TURN_ENDS_WITH_EOS = {"chatml": False, "llama3": True, "default_system": True}


@pytest.fixture(scope="module")
def gpt2(shared):
    from ds_sft.data.tokenizer import load_tokenizer

    return load_tokenizer(str(shared / "tokenizers" / "gpt2"))


def with_template(tokenizer, template: str):
    from copy import deepcopy

    copy = deepcopy(tokenizer)
    copy.chat_template = template
    return copy


@pytest.fixture(scope="module")
def chat_tokenizers(gpt2):
    return {name: with_template(gpt2, template) for name, template in TEMPLATES.items()}


@pytest.fixture(scope="module")
def smollm2():
    from ds_sft.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except UserError as err:
        pytest.skip(f"the SmolLM2-135M-Instruct GGUF is not installed ({err})")


# --- records and the reference ---------------------------------------------------------------------


def record_of(messages: list[dict]) -> dict:
    """The record ``ds_sft.data.sources`` makes of a well-formed conversation."""
    drops = Drops()
    (record,) = to_records(SourceSpec("chat", "generic", "-"), {"messages": [messages]}, drops)
    return record


def trained_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of trained tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check_against_reference(
    messages: list[dict], tokenizer, render_prompt_k, turn_ends_with_eos: bool
) -> None:
    """The document of ``messages`` trains exactly answer_k + EOS, preceded by exactly ``P_k``.

    ``render_prompt_k(messages[:i])`` is the reference text before assistant turn ``messages[i]``.
    Where the template's turn end is the EOS text, the EOS id stands for it and the texts are equal;
    where it is not, the EOS ids the answer convention adds are the only difference: they are
    counted, then taken out of both sides before comparing the prompt text.
    """
    docs = tokenize_records([record_of(messages)], tokenizer, "chat", {"chat": 0})
    tokens, mask = docs.tokens, docs.loss_mask()
    eos_text = tokenizer.eos_token
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = trained_runs(mask)
    assert len(runs) == len(answers)
    for (start, end), i in zip(runs, answers, strict=True):
        decode = tokenizer.backend_tokenizer.decode
        assert (
            decode(tokens[start:end].tolist(), skip_special_tokens=False) == messages[i]["content"] + eos_text
        )
        before = decode(tokens[:start].tolist(), skip_special_tokens=False)
        reference = render_prompt_k(messages[:i])
        if turn_ends_with_eos:
            assert before == reference
        else:
            assert before.replace(eos_text, "") == reference.replace(eos_text, "")
            assert before.count(eos_text) == reference.count(eos_text) + answers.index(i)
    assert end == len(tokens)  # the document ends with the last answer's EOS


def chat_reference(tokenizer):
    return lambda prefix: tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=True)


def alpaca_reference(prefix: list[dict]) -> str:
    """The documented plain-text transcript, written out independently of the code."""
    text = ALPACA_PREAMBLE
    for m in prefix:
        if m["role"] == "system":
            text += f"### System:\n{m['content']}\n\n"
        elif m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            text += f"{m['content']}{EOS}\n\n"
    return text


# --- generated conversations -----------------------------------------------------------------------

contents = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40).map(normalize_text)


@st.composite
def conversations(draw, nonempty_answers: bool = False, min_exchanges: int = 1):
    """An optional system turn, then 1-4 user/assistant exchanges; contents may be empty or unicode."""
    answer = contents.filter(bool) if nonempty_answers else contents
    messages = [{"role": "system", "content": draw(contents)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(min_exchanges, 4))):
        messages += [
            {"role": "user", "content": draw(contents)},
            {"role": "assistant", "content": draw(answer)},
        ]
    return messages


def sharegpt(messages: list[dict], plain_names: bool) -> list[dict]:
    names = {"system": "system", "user": "user" if plain_names else "human",
             "assistant": "assistant" if plain_names else "gpt"}  # fmt: skip
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


@pytest.mark.parametrize("name", list(TEMPLATES))
@given(messages=conversations())
@example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
def test_masks_match_the_chat_template_reference(chat_tokenizers, name, messages):
    tokenizer = chat_tokenizers[name]
    check_against_reference(messages, tokenizer, chat_reference(tokenizer), TURN_ENDS_WITH_EOS[name])


@given(messages=conversations())
def test_masks_match_the_plain_text_transcript(gpt2, messages):
    docs = tokenize_records([record_of(messages)], gpt2, "alpaca", {"chat": 0})
    runs = trained_runs(docs.loss_mask())
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    decode = gpt2.backend_tokenizer.decode
    for (start, end), i in zip(runs, answers, strict=True):
        assert (
            decode(docs.tokens[start:end].tolist(), skip_special_tokens=False) == messages[i]["content"] + EOS
        )
        assert decode(docs.tokens[:start].tolist(), skip_special_tokens=False) == alpaca_reference(
            messages[:i]
        )


@given(messages=conversations(), plain_names=st.booleans())
def test_sharegpt_and_openai_shapes_give_the_same_record(messages, plain_names):
    turns, reason = conversation_problem(sharegpt(messages, plain_names))
    assert reason is None and turns == messages
    columns = {"conversations": [sharegpt(messages, plain_names)]}
    (record,) = to_records(SourceSpec("chat", "generic", "-"), columns, Drops())
    assert record == record_of(messages)


def test_smollm2_template_masks_every_turn(smollm2):
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And ünïcode × 3? 日本"},
        {"role": "assistant", "content": "It is 12.\nDone."},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Ask me anything."},
    ]
    for with_system in (False, True):
        convo = ([{"role": "system", "content": "Be terse."}] if with_system else []) + messages
        check_against_reference(
            convo, smollm2, chat_reference(smollm2), turn_ends_with_eos=True
        )  # <|im_end|>


# --- templates that rewrite turns: each answer located in the whole render -------------------------


@pytest.fixture(scope="module")
def qwen3(gpt2):
    """GPT-2 with Qwen3's template and its turn markers as special tokens, ``<|im_end|>`` as EOS."""
    tokenizer = with_template(gpt2, QWEN3)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    return tokenizer


def qwen3_shown(content: str, final: bool) -> tuple[str, str]:
    """(markup before the answer, the answer) as Qwen3's template shows a cleaned assistant turn:
    the answer after the last user query as ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` (the
    markup when it has no reasoning), the earlier ones without their reasoning."""
    reasoning, think, answer = content.partition("</think>")
    if not think:
        return ("<think>\n\n</think>\n\n" if final else ""), content
    return "", (f"<think>\n{reasoning.removeprefix('<think>')}\n</think>\n\n{answer}" if final else answer)


def strips_reasoning_shown(content: str, final: bool) -> tuple[str, str]:
    return "", content if final else content.split("</think>")[-1]


def marks_final_answer_shown(content: str, final: bool) -> tuple[str, str]:
    return ("<think></think>" if final else ""), content


def check_located(messages: list[dict], tokenizer, shown) -> None:
    """The document of ``messages`` is the whole conversation as the template renders it (up to what
    follows the final turn end), and trains exactly each answer as shown + EOS, each after exactly
    ``P_k`` and the template's markup before that answer (``shown(content, final)``)."""
    docs = tokenize_records([record_of(messages)], tokenizer, "chat", {"chat": 0})
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # the prefix route is taken wherever it holds: here when no earlier answer has its reasoning stripped
    rewritten = shown is not strips_reasoning_shown or any(
        "</think>" in messages[i]["content"] for i in answers[:-1]
    )
    assert docs.routes.tolist() == [ROUTES.index("located" if rewritten else "prefix")]
    tokens, decode = docs.tokens.tolist(), tokenizer.backend_tokenizer.decode
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    text = decode(tokens, skip_special_tokens=False)
    assert whole.startswith(text) and not whole[len(text) :].strip()
    runs = trained_runs(docs.loss_mask())
    assert len(runs) == len(answers)
    for (start, end), i in zip(runs, answers, strict=True):
        markup, answer = shown(messages[i]["content"], i == answers[-1])
        assert decode(tokens[start:end], skip_special_tokens=False) == answer + tokenizer.eos_token
        assert (
            decode(tokens[:start], skip_special_tokens=False)
            == chat_reference(tokenizer)(messages[:i]) + markup
        )


@st.composite
def reasoning_conversations(draw):
    """Conversations of 2-4 exchanges (a single exchange is a one-turn record, prompt + answer) whose
    answers may carry reasoning: ``<think>{reasoning}</think>{answer}``."""
    messages = draw(conversations(nonempty_answers=True, min_exchanges=2))
    for m in messages:
        if m["role"] == "assistant" and draw(st.booleans()):
            m["content"] = f"<think>{draw(contents)}</think>{m['content']}"
    return messages


THINKING = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>add two and two</think>4"},
    {"role": "user", "content": "Say think."},
    {"role": "assistant", "content": "think"},
]  # fmt: skip


@given(messages=reasoning_conversations())
@example(messages=THINKING)
@example(messages=[*THINKING[1:4], {"role": "assistant", "content": "<think>3+3</think>6"}])
def test_qwen3_template_masks_every_turn_in_the_whole_render(qwen3, messages):
    check_located(messages, qwen3, qwen3_shown)


REWRITING = {"strips_reasoning": (STRIPS_REASONING, strips_reasoning_shown),
             "marks_final_answer": (MARKS_FINAL_ANSWER, marks_final_answer_shown)}  # fmt: skip


@pytest.fixture(scope="module")
def rewriting_tokenizers(gpt2):
    return {name: with_template(gpt2, template) for name, (template, _) in REWRITING.items()}


@pytest.mark.parametrize("name", list(REWRITING))
@given(messages=reasoning_conversations())
@example(messages=THINKING)
def test_templates_that_rewrite_turns_mask_every_turn_in_the_whole_render(
    rewriting_tokenizers, name, messages
):
    check_located(messages, rewriting_tokenizers[name], REWRITING[name][1])


def test_a_template_that_rewrites_answers_is_refused_in_one_line(gpt2):
    tokenizer = with_template(gpt2, UPPERCASES_ANSWERS)
    messages = THINKING[1:] + [{"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye."}]
    with pytest.raises(
        UserError, match=r"turn 2's content is not in the whole render.*--train_on last.*--template alpaca"
    ) as err:
        tokenize_records([record_of(messages)], tokenizer, "chat", {"chat": 0})
    assert "\n" not in str(err.value)
    docs = tokenize_records([record_of(messages)], tokenizer, "chat", {"chat": 0}, train_on="last")
    assert len(trained_runs(docs.loss_mask())) == 1  # --train_on last: the final answer only


# --- malformed conversations -----------------------------------------------------------------------

BAD = {
    "empty_conversation": [],
    "bad_turn": [{"role": "user"}, {"role": "assistant", "content": "A"}],
    "non_string_content": [{"role": "user", "content": ["Q"]}, {"role": "assistant", "content": "A"}],
    "unknown_role": [{"role": "tool", "content": "Q"}, {"role": "assistant", "content": "A"}],
    "roles_out_of_order": [
        {"role": "user", "content": "Q"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A"},
    ],  # fmt: skip
    "no_final_assistant_turn": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"},
    ],  # fmt: skip
}
MORE_BAD = {  # other members of the same classes
    "empty_conversation": "not a list",
    "bad_turn": ["a string turn", {"role": "assistant", "content": "A"}],
    "non_string_content": [{"from": "human", "value": None}, {"from": "gpt", "value": "A"}],
    "unknown_role": [{"from": "bot", "value": "Q"}, {"from": "gpt", "value": "A"}],
    "roles_out_of_order": [{"role": "assistant", "content": "A"}],
    "no_final_assistant_turn": [{"role": "system", "content": "S"}],
}


@pytest.mark.parametrize("reason", list(BAD))
def test_malformed_conversations_are_dropped_with_their_reason(reason):
    for bad in (BAD[reason], MORE_BAD[reason]):
        assert conversation_problem(bad) == ([], reason)


def test_prepare_counts_every_dropped_conversation(run_prepare, tmp_path):
    good = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(30)
    ]
    rows = (
        good + [{"messages": bad} for bad in BAD.values()] + [{"messages": bad} for bad in MORE_BAD.values()]
    )
    empty_answer = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "},
                    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [*rows, {"messages": empty_answer}])
    manifest = run_prepare(["--source", f"chat={path}", "--output_dir", str(tmp_path / "out")])
    counts = manifest["counts"]["chat"]
    assert counts["dropped"] == {**{reason: 2 for reason in BAD}, "empty_response": 1}
    assert counts["rows_in"] == counts["kept"] + sum(counts["dropped"].values()) == len(rows) + 1


# --- --train_on last is today's output, byte for byte ----------------------------------------------


def fixture_rows() -> list[dict]:
    """Conversations with and without a system turn, 1-4 exchanges, earlier turns not normalized."""
    rows = []
    for i in range(60):
        turns = [{"role": "system", "content": f"You are helper {i}. Answer briefly."}] if i % 3 == 0 else []
        for t in range(1 + i % 4):
            turns.append({"role": "user", "content": f"Question {t} of chat {i}: what is {i} times {t}?  "})
            turns.append({"role": "assistant", "content": f"{i} times {t} is {i * t}.\r\nDone {t}."})
        rows.append({"messages": turns})
    return rows


# sha256 over the train/ and val/ files (name then bytes, sorted) that ds-sft wrote for fixture_rows()
# before conversations trained every turn (commit 47ffe78), with the GPT-2 tokenizer.
TODAY = {
    "alpaca": "ea836f228a15a172300b555a801ebab63f194bc1e0d288f86c87adcdda41bd80",
    "chat": "20404747a035620b2b9341e2c9024ff60a0c16b21664bd72d6bddbc04ced21d6",
}


def split_files_hash(directory) -> str:
    digest = hashlib.sha256()
    for path in sorted((directory / "train").iterdir()) + sorted((directory / "val").iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_train_on_last_is_todays_output_byte_for_byte(gpt2, template, tmp_path, monkeypatch):
    import ds_sft.locations
    from ds_sft.data import prepare

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    path = write_jsonl(tmp_path / "chat.jsonl", fixture_rows())
    tokenizer_dir = tmp_path / "tokenizer"
    with_template(gpt2, CHATML).save_pretrained(str(tokenizer_dir))
    outputs = {}
    for train_on in ("last", "all"):
        out = tmp_path / train_on
        argv = ["--source", f"chat={path}", "--tokenizer", str(tokenizer_dir), "--template", template,
                "--seq_len", "256", "--val_fraction", "0.1", "--decontam_threshold", "0",
                "--output_dir", str(out), "--train_on", train_on]  # fmt: skip
        prepare.run(parse_prepare_args(argv))
        outputs[train_on] = json.loads((out / "manifest.json").read_text())["splits"]
        if train_on == "last":
            assert split_files_hash(out) == TODAY[template]
    # the same documents, more of each trained
    assert outputs["all"]["train"]["documents"] == outputs["last"]["train"]["documents"]
    assert outputs["all"]["train"]["trained_tokens"] > 2 * outputs["last"]["train"]["trained_tokens"]


def test_manifest_counts_how_each_conversation_was_masked(gpt2, qwen3, tmp_path, monkeypatch):
    import ds_sft.locations
    from ds_sft.data import prepare

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    rows = fixture_rows()
    # conversations with turns before the last exchange (a system turn counts); a lone user + assistant
    # pair is a one-turn record (prompt, answer), whatever --train_on says
    multi_turn = sum(len(row["messages"]) > 2 for row in rows)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    for name, tokenizer, route in (
        ("chatml", with_template(gpt2, CHATML), "prefix"),
        ("qwen3", qwen3, "located"),
    ):
        tokenizer.save_pretrained(str(tmp_path / name))
        argv = ["--source", f"chat={path}", "--tokenizer", str(tmp_path / name), "--seq_len", "256",
                "--decontam_threshold", "0", "--output_dir", str(tmp_path / f"out_{name}")]  # fmt: skip
        prepare.run(parse_prepare_args(argv))
        counts = json.loads((tmp_path / f"out_{name}" / "manifest.json").read_text())["counts"]["chat"]
        assert counts["kept"] == len(rows)
        assert counts["turns_masked_by"] == {"prefix": 0, "located": 0, route: multi_turn}


# --- one multi-turn file through prepare -> train -> eval ------------------------------------------


def test_multi_turn_file_goes_through_prepare_train_and_eval(gpt2, tmp_path, monkeypatch):
    import torch

    import ds_sft.locations
    from ds_sft.cli import main
    from ds_sft.data.shards import PackedDataset
    from ds_sft.model.checkpoint import save_model
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    monkeypatch.chdir(tmp_path)
    tokenizer_dir = tmp_path / "tokenizer"
    with_template(gpt2, CHATML).save_pretrained(str(tokenizer_dir))
    rows = [
        {"conversations": [{"from": "system", "value": "Count politely."}] * (i % 2)
         + [turn for t in range(1 + i % 3) for turn in (
             {"from": "human", "value": f"What comes after {i + t}?"},
             {"from": "gpt", "value": f"{i + t + 1} comes after {i + t}."})]}
        for i in range(48)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    main(["prepare", "--source", f"chat={path}", "--tokenizer", str(tokenizer_dir), "--seq_len", "128",
          "--val_fraction", "0.2", "--output_dir", "data"])  # fmt: skip
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["template"] == "chat" and manifest["config"]["train_on"] == "all"
    torch.manual_seed(0)
    save_model(LlamaModel(ModelConfig.preset("tiny", vocab_size=50304)), tmp_path / "base")
    main(["train", "--data_dir", "data", "--base_model", "base", "--max_iters", "2", "--micro_batch_size",
          "2", "--grad_accum", "2", "--eval_iters", "1", "--fp8", "off", "--kernels", "torch",
          "--out_dir", "run"])  # fmt: skip
    effective = json.loads((tmp_path / "run" / "effective_config.json").read_text())
    assert effective["zero_optimization"]["stage"] == 2  # the recipe's ZeRO stage, the default
    main(["eval", "--model", "run", "--data_dir", "data", "--no_gsm8k", "--max_new_tokens", "4",
          "--dtype", "float32", "--out", "eval"])  # fmt: skip
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    val = PackedDataset(tmp_path / "data", "val")
    trained = sum(int((val[i]["labels"] != -100).sum()) for i in range(len(val)))
    assert (
        report["models"][0]["val"]["overall"]["tokens"]
        == trained
        == manifest["splits"]["val"]["trained_tokens"]
    )


# --- memory: a long conversation is rendered a prefix at a time ------------------------------------


@pytest.mark.parametrize(("name", "route"), [("chatml", "prefix"), ("strips_reasoning", "located")])
def test_a_long_conversation_holds_one_prefix_render_at_a_time(gpt2, name, route):
    """All k prefix renders were held at once: a conversation of 400 turns of 50 kB (a 26 MB row)
    took 5.4 GB. Here 60 exchanges of 20 kB: the peak is a few times the conversation's size, where
    holding every prefix render took 35 times it."""
    import tracemalloc

    from ds_sft.data.templates import answer_end_id, conversation_segments

    tokenizer = with_template(gpt2, CHATML if name == "chatml" else STRIPS_REASONING)
    messages = []
    for i in range(60):
        answer = f"answer {i}" + ("</think>ok" if route == "located" else "")
        messages += [
            {"role": "user", "content": f"question {i} " + "x" * 20_000},
            {"role": "assistant", "content": answer},
        ]
    record = record_of(messages)
    size = sum(len(m["content"]) for m in messages)
    end_id = answer_end_id(tokenizer, "chat")
    tracemalloc.start()
    try:
        segments, used = conversation_segments(record, "chat", tokenizer, end_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert used == route and len(segments) == 60
    assert peak < 12 * size, (peak, size)  # 5x (prefix) and 8x (located); 35x both, all renders held


def _weighted(weights: list, tag: str = "ANSWER") -> dict:
    """A conversation of len(weights) exchanges, the assistant answers carrying those weights
    (None: no weight key)."""
    messages = []
    for i, weight in enumerate(weights):
        messages.append({"role": "user", "content": f"Question {tag} {i}?"})
        answer = {"role": "assistant", "content": f"{tag}{i} here."}
        messages.append(answer if weight is None else {**answer, "weight": weight})
    return {"messages": messages}


@pytest.mark.parametrize(
    ("weights", "trained", "dropped"),
    [
        ([1, 1, 1], [0, 1, 2], None),
        ([None, None], [0, 1], None),
        ([0, 0, 1], [2], None),
        ([0, None], [1], None),
        ([0, 0], [], "no_trained_turn"),
        ([1, 0], [], "unsupported_turn_weights"),
        ([1, 0, 1], [], "unsupported_turn_weights"),
        ([0.5, 1], [], "bad_turn_weight"),
        (["0", 1], [], "bad_turn_weight"),
    ],
)
def test_openai_turn_weights_decide_which_answers_train(
    run_prepare, tiny_tokenizer, tmp_path, weights, trained, dropped
):
    """OpenAI's format marks answers not to train with "weight": 0; they were trained all the same.
    Weights --train_on can express are honoured (an answer of weight 0 stays prompt text), the
    others dropped by reason, never trained wrongly."""
    import numpy as np

    rows = [_weighted(weights)] + [_weighted([None], tag=f"filler{k}x") for k in range(3)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    manifest = run_prepare(["--source", f"chat={data}", "--template", "alpaca", "--output_dir", str(out),
                            "--val_fraction", "0", "--decontam_threshold", "0"])  # fmt: skip
    counts = manifest["counts"]["chat"]
    assert counts["dropped"] == ({dropped: 1} if dropped else {})
    tokens = np.load(out / "train" / "shard_00000.tokens.npy")
    mask = np.load(out / "train" / "shard_00000.loss_mask.npy").astype(bool)
    trained_text = "".join(
        tiny_tokenizer.decode(row[m].tolist()) for row, m in zip(tokens, mask, strict=True)
    )
    for i in range(len(weights)):
        assert (f"ANSWER{i}" in trained_text) == (i in trained), (i, trained_text)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_rendering_with_a_chat_template_shows_its_progress(chat_tokenizers, template, capsys):
    """A chat template's renders ran before the tokenize bar, with nothing on screen (minutes, for a
    large multi-turn mix and an elaborate template); an Alpaca prompt is too quick to need a bar."""
    records = [
        record_of(
            [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] * (1 + i % 2)
        )
        for i in range(6)
    ]
    tokenize_records(records, chat_tokenizers["chatml"], template, {"chat": 0})
    err = capsys.readouterr().err
    assert ("render turns" in err and "render prompts" in err) == (template == "chat"), err


# --- the template's own end of turn ---------------------------------------------------------------

CHATML_SPECIAL = (  # ChatML as SmolLM2 and Qwen2.5 write it: <|im_end|> is a special token there
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_SPECIAL = (  # Llama 3's shape: BOS first, headers, each turn ended by <|eot_id|>
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# name: (template, eos, bos, the special token the template writes after an answer)
END_OF_TURN_LAYOUTS = {
    "smollm2_like": (CHATML_SPECIAL, "<|im_end|>", None, "<|im_end|>"),
    "qwen25_like": (CHATML_SPECIAL, "<|endoftext|>", None, "<|im_end|>"),
    "llama3_like": (LLAMA3_SPECIAL, "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"),
}
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
FIXED_CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "The capital of France is Paris."}],
    "multi_turn": [{"role": "system", "content": "Be kind."},
                   {"role": "user", "content": "Give three tips."},
                   {"role": "assistant", "content": "Eat well, sleep, exercise."},
                   {"role": "user", "content": "How many clips?"},
                   {"role": "assistant", "content": "48/2 = 24 clips.\n#### 72"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def special_chat_tokenizers(tmp_path_factory):
    """Byte-level BPEs whose chat markup is special tokens, one per END_OF_TURN_LAYOUTS entry."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ds_sft.data.tokenizer import load_tokenizer
    from tests.data.conftest import CORPUS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=CHAT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    made = {}
    for name, (template, eos, bos, _) in END_OF_TURN_LAYOUTS.items():
        folder = tmp_path_factory.mktemp(name)
        tokenizer.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "chat_template": template}
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
        made[name] = load_tokenizer(str(folder))
    return made


@pytest.mark.parametrize("conversation", list(FIXED_CONVERSATIONS))
@pytest.mark.parametrize("layout", list(END_OF_TURN_LAYOUTS))
def test_answers_end_with_the_templates_own_end_of_turn(special_chat_tokenizers, layout, conversation):
    """Each answer is followed by the template's end-of-turn token, trained with it, and by no EOS the
    template does not write: where that token is not EOS (Qwen2.5, Llama 3 base) every answer ended
    in a trained EOS and the template's turn end followed it untrained (``answer<|endoftext|><|im_end|>``).
    Reference: apply_chat_template's render of the conversation, tokenized whole; the document is that
    render up to the last answer's end of turn (after it the template writes only whitespace), and
    its trained runs are exactly each answer and that token. eval stops generating at that token."""
    from ds_sft.eval.evaluate import EvalData

    tokenizer = special_chat_tokenizers[layout]
    end = END_OF_TURN_LAYOUTS[layout][3]
    messages = FIXED_CONVERSATIONS[conversation]
    docs = tokenize_records([record_of(messages)], tokenizer, "chat", {"chat": 0})
    tokens, mask = docs.tokens.tolist(), docs.loss_mask()
    render = tokenizer.apply_chat_template(messages, tokenize=False)
    reference = tokenizer(render, add_special_tokens=False)["input_ids"]
    decode = tokenizer.backend_tokenizer.decode
    assert tokens == reference[: len(tokens)]
    assert decode(reference[len(tokens) :], skip_special_tokens=False).strip() == ""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = [decode(tokens[start:stop], skip_special_tokens=False) for start, stop in trained_runs(mask)]
    assert runs == [answer + end for answer in answers]
    data = EvalData(data_dir=None, template="chat", tokenizer=tokenizer, val=None)
    assert tokenizer.convert_tokens_to_ids(end) in data.stop_ids


def test_the_end_of_turn_probe_renders_once_per_call(special_chat_tokenizers, monkeypatch):
    """The id that ends each answer (``templates.answer_end_id``) rendered the template's end-of-turn
    probe for every conversation (0.1 ms each: 5 s over 50k); each call finds it once and hands it
    down, whatever its rows, the long ones judged before they are rendered included."""
    from ds_sft.data import templates
    from ds_sft.data.tokenize import FITTED, bound_records

    probes = []
    probe = templates.end_of_turn_ids
    monkeypatch.setattr(templates, "end_of_turn_ids", lambda tokenizer: probes.append(1) or probe(tokenizer))
    tokenizer = special_chat_tokenizers["qwen25_like"]
    records = [record_of(messages) for messages in FIXED_CONVERSATIONS.values()] * 3
    kept, _ = bound_records(records, tokenizer, "chat", "all", 16, truncate=True)
    assert len(probes) == 1 and sum(FITTED in record for record in kept) > 1
    for seq_len in (None, 16):
        probes.clear()
        tokenize_records(records, tokenizer, "chat", {"chat": 0}, seq_len=seq_len, truncate=True)
        assert len(probes) == 1
