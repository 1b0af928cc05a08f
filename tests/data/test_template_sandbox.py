"""Chat templates render in ds-sft's bounded sandbox (:mod:`ds_sft.data.template_sandbox`) exactly as
``tokenizer.apply_chat_template(..., tokenize=False)`` renders them: same text, byte for byte, for
real templates (SmolLM2's, Qwen3's, the test templates of ``test_conversations``) and for templates
using what transformers' environment adds (``tojson``, ``namespace``, ``dict``, loop controls,
``{% generation %}``, trimmed blocks, special tokens). What the sandbox refuses is in
``test_template_limits.py``."""

from __future__ import annotations

import pytest

from ds_sft.data.template_sandbox import render_chat
from tests.data.test_conversations import (
    CHATML,
    DEFAULT_SYSTEM,
    LLAMA3,
    MARKS_FINAL_ANSWER,
    QWEN3,
    STRIPS_REASONING,
    UPPERCASES_ANSWERS,
    with_template,
)

# What transformers' chat-template environment offers beyond Jinja's own sandbox, as templates on the
# Hub use it (Llama 3.1 tools JSON, Mistral's loop controls and raise_exception branches, SmolLM3's
# namespace, {% generation %} blocks of assistant masks, dict(...) in tool templates).
TRANSFORMERS_FEATURES = (
    "{%- set ns = namespace(system='', count=0) %}"
    "{%- for m in messages if m.role == 'system' %}{%- set ns.system = m.content %}{%- endfor %}"
    "{{ bos_token }}{% if ns.system %}[SYS]{{ ns.system }}[/SYS]\n{% endif %}"
    "{% for m in messages %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {% set ns.count = ns.count + 1 %}\n"
    "  {% if m.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ m.role) }}{% endif %}\n"
    "  {% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content | trim }}{{ eos_token }}{% endgeneration %}\n"
    "  {% else %}{{ ns.count }}. {{ {'role': m.role, 'text': m.content} | tojson }}\n"
    "{{ dict(a=m.role, n=loop.index) | tojson(indent=2) }}|"
    "{{ '%-8s|' % m.role }}{{ '{:>6}'.format(loop.index) }}\n"
    "  {% endif %}\n"
    "  {% if loop.index > 40 %}{% break %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' | center(14) }}{{ ['a', 'b'] | join('/') }}{% endif %}"
)
TEMPLATES = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "default_system": DEFAULT_SYSTEM,
    "strips_reasoning": STRIPS_REASONING,
    "marks_final_answer": MARKS_FINAL_ANSWER,
    "qwen3": QWEN3,
    "uppercases_answers": UPPERCASES_ANSWERS,
    "transformers_features": TRANSFORMERS_FEATURES,
}
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": '  4 <b>&</b> "é"\n'}],
    [
        {"role": "system", "content": "Be brief.\n\nAlways."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nuno"},
        {"role": "user", "content": "two\twith a tab"},
        {"role": "assistant", "content": "dos"},
    ],
]


def _same_as_transformers(tokenizer) -> None:
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert render_chat(tokenizer, messages, generation_prompt) == expected


@pytest.fixture(scope="module")
def gpt2(shared):
    from ds_sft.data.tokenizer import load_tokenizer

    return load_tokenizer(str(shared / "tokenizers" / "gpt2"))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_chat_template_renders_as_apply_chat_template_does(gpt2, name):
    _same_as_transformers(with_template(gpt2, TEMPLATES[name]))


def test_smollm2s_own_template_renders_as_apply_chat_template_does():
    from ds_sft.data.tokenizer import load_tokenizer
    from ds_sft.errors import UserError

    try:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
    except UserError as err:
        pytest.skip(f"the SmolLM2-135M-Instruct GGUF is not installed ({err})")
    assert tokenizer.chat_template
    _same_as_transformers(tokenizer)


def test_a_template_that_raises_raises_in_the_sandbox_too(gpt2):
    from jinja2.exceptions import TemplateError

    tokenizer = with_template(gpt2, TRANSFORMERS_FEATURES)
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(TemplateError, match="unknown role tool"):
        tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(TemplateError, match="unknown role tool"):
        render_chat(tokenizer, messages, False)


# Each sized filter with its arguments given as a template gives them: positionally, by name, and
# on a lazy value. The sizing binds them to the filter's own names; a wrong binding (Jinja's
# async-ready filters take an eval context their signature does not name) sized the wrong argument.
ORDINARY_FILTER_CALLS = [
    "{{ 'ab'|center(9) }}",
    "{{ 'a\nb'|indent(3, first=true) }}",
    "{{ 'aa bb cc'|wordwrap(3, wrapstring='|') }}",
    "{{ 'aXbX'|replace('X', '--', 1) }}",
    "{{ '%s-%s'|format(1, 2) }}",
    "{{ range(4)|join(', ') }}",
    "{{ range(4)|map('string')|join('+') }}",
    "{{ range(7)|batch(3, 'x')|list }}",
    "{{ range(7)|slice(3)|list }}",
    "{{ range(7)|slice(3, fill_with=0)|list }}",
    "{{ range(7)|map('string')|slice(2)|list }}",
    "{{ 'abcde'|slice(2)|list }}",
    "{{ [[1], [2]]|sum(start=[]) }}",
    "{{ range(5)|sum }}",
    "{{ {'a': [1, 2]}|tojson(indent=2) }}",
]


@pytest.mark.parametrize("template", ORDINARY_FILTER_CALLS)
def test_sized_filters_render_as_jinjas_own(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ds_sft.data.template_sandbox import bounded_sandbox_class

    expected = ImmutableSandboxedEnvironment().from_string(template).render()
    assert bounded_sandbox_class()().from_string(template).render() == expected


def test_lipsum_renders_within_bounds():
    from ds_sft.data.template_sandbox import bounded_sandbox_class

    text = bounded_sandbox_class()().from_string("{{ lipsum(2, html=false, min=3, max=5) }}").render()
    assert 6 <= len(text.split()) <= 10
