"""Where a chat model's answer ends: the chat template's end-of-turn token, found from the template
itself, is a stop token beside EOS (ChatML, Llama 3 and Gemma styles, on a GPT-2 vocabulary whose
EOS is none of them)."""

from __future__ import annotations

import pytest

from ds_sft.data.templates import end_of_turn_ids
from ds_sft.eval.evaluate import EvalData

TEMPLATES = {
    "<|im_end|>": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "<|eot_id|>": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    ),
    "<end_of_turn>": (
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    ),
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>"]  # fmt: skip


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    from ds_sft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(gpt2_tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tokenizer


@pytest.mark.parametrize("end", TEMPLATES)
def test_end_of_turn_token_comes_from_the_template(gpt2, end):
    gpt2.chat_template = TEMPLATES[end]
    assert end_of_turn_ids(gpt2) == [gpt2.convert_tokens_to_ids(end)]
    data = EvalData(data_dir=None, template="chat", tokenizer=gpt2, val=None)
    assert data.stop_ids == [gpt2.eos_token_id, gpt2.convert_tokens_to_ids(end)]
    # the Alpaca template has no turns: EOS alone
    assert EvalData(data_dir=None, template="alpaca", tokenizer=gpt2, val=None).stop_ids == [
        gpt2.eos_token_id
    ]


def test_a_template_that_ends_turns_with_plain_text_adds_no_stop_token(gpt2):
    gpt2.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_ids(gpt2) == []


def test_the_end_of_turn_probe_renders_in_the_bounded_sandbox(gpt2):
    """eval rendered its probe with apply_chat_template, outside every bound: a value computed from
    the conversation (4 GB per message here) was built in one C call. It is refused before it is
    built, in one line."""
    import tracemalloc

    from ds_sft.errors import UserError

    gpt2.chat_template = TEMPLATES["<|im_end|>"] + "{{ 'x' * (messages|length * 4000000000) }}"
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="chat template of .* would build over") as info:
            end_of_turn_ids(gpt2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and peak < 64 << 20
