"""A chat template is a program: one that runs away (nested loops, loops over huge ranges or strings,
work that grows with the conversation) is stopped within ``TEMPLATE_SECONDS``, one that grows the
process past ``TEMPLATE_GROWTH_BYTES`` is stopped there, and one that would build a large value
(a constant, or a size computed from the data) is refused before the value exists: each in one line
naming the template and the fix, through ``prepare`` as well; ordinary templates render unchanged
(``tests/data/test_conversations.py``, ``tests/data/test_template_sandbox.py``)."""

from __future__ import annotations

import json
import time

import pytest

from ds_sft.data import template_sandbox, templates
from ds_sft.errors import UserError
from tests.data.conftest import EOS
from tests.data.helpers import alpaca_rows, parse_prepare_args, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RUNAWAY = {
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "three_deep": "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "per_message": "{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ '' }}{% endfor %}{% endfor %}{% endfor %}",
    "over_a_long_string": "{% for c in 'abcdefghij' * 100000 %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "writes_a_lot": "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "macro_loop": "{% macro spin(n) %}{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
    "{% endmacro %}{{ spin(100000) }}",
}


@pytest.fixture(autouse=True)
def sizes_only(monkeypatch):
    """The watchdog out of the way (a busy machine renders slowly): only a size check may refuse, and
    a render that must succeed is never stopped by time, however long the machine holds it up."""
    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 600.0)
    monkeypatch.setattr(template_sandbox, "TEMPLATE_GROWTH_BYTES", 1 << 40)


@pytest.fixture
def short_limit(monkeypatch):
    """Limits a runaway (hours of work, or gigabytes) passes at once, for the tests of the watchdog."""
    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 0.3)
    monkeypatch.setattr(template_sandbox, "TEMPLATE_GROWTH_BYTES", 32 << 20)


def tokenizer_dir(tmp_path, tiny_tokenizer_file, template: str):
    folder = tmp_path / "tok"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tiny_tokenizer_file.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_a_runaway_template_is_stopped_and_refused_in_one_line(
    tmp_path, tiny_tokenizer_file, name, where, short_limit
):
    from ds_sft.data.tokenizer import load_tokenizer

    template = RUNAWAY[name] + CHATML if where == "before" else CHATML + RUNAWAY[name]
    folder = tokenizer_dir(tmp_path, tiny_tokenizer_file, template)
    tokenizer = load_tokenizer(str(folder))
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        templates.render_prompt({"id": "a:0", "instruction": "hi", "input": ""}, "chat", tokenizer)
    assert time.monotonic() - start < 30  # stopped, not run to its end (hours)
    message = str(info.value)
    assert "\n" not in message and message.startswith("a:0: the chat template of ")
    assert str(folder) in message and "--template alpaca" in message
    spent = ("ran over 0.3 s", "grew the process by over 32 MiB", "would build over")  # what comes first
    assert any(what in message for what in spent)


def test_prepare_refuses_a_runaway_template_in_one_line(
    tmp_path, tiny_tokenizer_file, monkeypatch, short_limit
):
    import ds_sft.locations
    from ds_sft.data import prepare

    monkeypatch.setattr(ds_sft.locations, "shared_dir", lambda: None)
    folder = tokenizer_dir(tmp_path, tiny_tokenizer_file, RUNAWAY["nested_ranges"] + CHATML)
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(30))
    args = parse_prepare_args(
        ["--alpaca", str(data), "--tokenizer", str(folder), "--output_dir", str(tmp_path / "out")]
    )
    with pytest.raises(UserError, match="ran over 0.3 s rendering one conversation"):
        prepare.run(args)
    assert not (tmp_path / "out").exists()


def test_renders_after_a_stopped_one_are_not_disturbed(
    tmp_path, tiny_tokenizer_file, monkeypatch, short_limit
):
    """The stop is delivered to the runaway render only: the next renders, on this thread, succeed."""
    from ds_sft.data.tokenizer import load_tokenizer

    hostile = load_tokenizer(
        str(tokenizer_dir(tmp_path / "a_dir", tiny_tokenizer_file, RUNAWAY["three_deep"]))
    )
    fine = load_tokenizer(str(tokenizer_dir(tmp_path / "b_dir", tiny_tokenizer_file, CHATML)))
    record = {"instruction": "hi", "input": ""}
    with pytest.raises(UserError):
        templates.render_prompt(record, "chat", hostile)
    # a stop the runaway left pending would still arrive; a busy machine's slow render must not
    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 600.0)
    for _ in range(2000):
        assert (
            templates.render_prompt(record, "chat", fine)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )
    time.sleep(0.5)  # past the old deadline: nothing arrives late
    assert templates.render_prompt(record, "chat", fine).startswith("<|im_start|>user")


# strings that grow without end: each step copies all of it, so growth is slow enough to watch
GROWING = {
    "namespace_concat": "{% set ns = namespace(s='') %}{% for i in range(100000) %}"
    "{% set ns.s = ns.s ~ ('x' * 100000) %}{% endfor %}{{ ns.s|length }}",
    "list_append": "{% set ns = namespace(s=[]) %}{% for i in range(100000) %}"
    "{% set ns.s = ns.s + ['y' * (i * 1000)] %}{% endfor %}{{ ns.s|length }}",
    "joined_messages": "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% for m in messages %}"
    "{% set ns.s = ns.s ~ m['content'] * 5000 %}{% endfor %}{% endfor %}{{ ns.s|length }}",
    "macro_output": "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endmacro %}"
    "{{ m()|length }}",  # a macro's output is held in a list no size check sees
}


@pytest.mark.parametrize("name", sorted(GROWING))
def test_a_template_that_grows_the_process_is_stopped(
    tmp_path, tiny_tokenizer_file, monkeypatch, name, short_limit
):
    from ds_sft.data.tokenizer import load_tokenizer

    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 60.0)
    tokenizer = load_tokenizer(str(tokenizer_dir(tmp_path, tiny_tokenizer_file, GROWING[name] + CHATML)))
    with pytest.raises(UserError) as info:
        templates.render_prompt({"id": "a:0", "instruction": "hello there", "input": ""}, "chat", tokenizer)
    message = str(info.value)
    # the size checks refuse a value past its limit; what they cannot see, the watchdog stops
    spent = "grew the process by over 32 MiB" if name == "macro_output" else "would build over"
    assert "\n" not in message and spent in message and "--template alpaca" in message


@pytest.mark.parametrize(
    "constant",
    ["'a' * 3000000000", "3000000000 * 'a'", "('ab' * 1000) * 1000", "[1] * 10**7", "10 ** 100000000",
     "'x' * 2000000", "('a' + 'b') * 600000"],
)  # fmt: skip
def test_a_template_with_a_huge_constant_is_refused_before_it_compiles(
    tmp_path, tiny_tokenizer_file, constant
):
    from ds_sft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        str(tokenizer_dir(tmp_path, tiny_tokenizer_file, "{{ " + constant + " }}" + CHATML))
    )
    with pytest.raises(UserError, match="would build (over 1,0|a number of over 65,536 bits)") as info:
        templates.render_prompt({"instruction": "hi", "input": ""}, "chat", tokenizer)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "constant", ["'-' * 80", "1024 * 1024 * 1024", "2 ** 62", "[0] * 1000", "'ab' + 'cd'"]
)
def test_small_constants_render(tmp_path, tiny_tokenizer_file, constant):
    from ds_sft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        str(tokenizer_dir(tmp_path, tiny_tokenizer_file, "{{ " + constant + " }}" + CHATML))
    )
    rendered = templates.render_prompt({"instruction": "hi", "input": ""}, "chat", tokenizer)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("statements", "refused"),
    [
        ("{% set n = 3000000000 %}{{ ('a' * n)|length }}", True),
        ("{% set n = 40000 %}{% set m = n * n %}{{ 'a' * m }}", True),
        ("{% set s = 'ab' %}{% set n = 10**9 %}{{ s * n }}", True),
        ("{% set n = 10 %}{% set n = 3000000000 %}{{ n * 'a' }}", True),  # the largest value a name takes
        ("{% set n = 80 %}{{ '-' * n }}", False),
        ("{{ 'assistant:'|center(3000000000)|trim }}", True),  # 3.3 GB in one C call, past the watchdog
        ("{{ 'x'.ljust(10**10) }}", True),
        ("{% set w = 4000000000 %}{{ 'a\nb'|indent(w) }}", True),
        ("{{ '7'.zfill(2 ** 40) }}", True),
        ("{{ 'x'|center(80) }}{{ 'line'|indent(4) }}{{ '7'.zfill(3) }}", False),
        ("{% set n = 1000 %}{% set line = '-' * n %}{{ line }}", False),
    ],
)
def test_a_name_set_to_a_huge_constant_counts_as_that_constant(
    tmp_path, tiny_tokenizer_file, statements, refused
):
    """{% set n = 4000000000 %}{{ 'a' * n }} built 4 GB in one C call at render time (248 s, 4.2 GB
    peak; a larger n: killed for memory): only literal constants were checked."""
    from ds_sft.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir(tmp_path, tiny_tokenizer_file, statements + CHATML)))
    record = {"instruction": "hi", "input": ""}
    if not refused:
        assert "hi" in templates.render_prompt(record, "chat", tokenizer)
        return
    with pytest.raises(UserError, match="would build (over 1,0|a number of over 65,536 bits)") as info:
        templates.render_prompt(record, "chat", tokenizer)
    assert "\n" not in str(info.value)


# Values a template computes from its data at render time, each of which would take over 1 GiB in
# one C call (the review's 3-row input: 'x' * (messages|length * 4000000000), 8 GB and 87 s, past
# both watchdogs). HUGE is worked out from the conversation, so no check of constants can see it.
HUGE = "(messages|length * 4000000000)"
MEGA = "{% set mega = '-' * (messages|length * 1000000) %}"  # within the limit itself
COMPUTED_SIZES = {
    "str_times_int": "{{ 'x' * " + HUGE + " }}",
    "int_times_str": "{{ " + HUGE + " * messages[0].content }}",
    "int_power": "{{ 7 ** " + HUGE + " }}",
    "list_times_int": "{{ ([messages[0]] * " + HUGE + ")|length }}",
    "printf_star": "{{ '%*s' % (" + HUGE + ", 'x') }}",
    "printf_width": "{{ ('%' ~ " + HUGE + " ~ 's') % 'x' }}",
    "printf_precision": "{{ ('%.' ~ " + HUGE + " ~ 'f') % 1.5 }}",
    "format_width": "{{ ('{:>' ~ " + HUGE + " ~ '}').format('x') }}",
    "format_nested_width": "{{ '{:>{}}'.format('x', " + HUGE + ") }}",
    "format_fields": MEGA + "{{ ('{0}' * 100000).format(mega) }}",
    "format_map_fields": MEGA + "{{ ('{a}' * 100000).format_map({'a': mega}) }}",
    "printf_fields": MEGA + "{{ ('%(a)s' * 100000) % {'a': mega} }}",
    "translate": MEGA + "{{ ('x' * 100000).translate({120: mega}) }}",
    "format_filter": "{{ ('%' ~ " + HUGE + " ~ 's')|format('x') }}",
    "center_filter": "{{ 'x'|center(" + HUGE + ") }}",
    "center_method": "{{ 'x'.center(" + HUGE + ") }}",
    "ljust_method": "{{ messages[0].content.ljust(" + HUGE + ") }}",
    "zfill_method": "{{ '7'.zfill(" + HUGE + ") }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(" + HUGE + ") }}",
    "indent_width": "{{ 'a\nb'|indent(" + HUGE + ") }}",
    "indent_lines": MEGA + "{{ ('\n' * 2000)|indent(mega) }}",
    "wordwrap": MEGA + "{{ ('a ' * 2000)|wordwrap(1, wrapstring=mega) }}",
    "range": "{{ range(" + HUGE + ")|length }}",
    "join_filter": MEGA + "{{ range(4000)|join(mega) }}",
    "join_method": MEGA + "{{ mega.join(range(4000)|map('string')) }}",
    "concat_tilde": MEGA + "{% set ns = namespace(s=mega) %}{% for i in range(12) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "concat_plus": MEGA + "{% set ns = namespace(s=mega) %}{% for i in range(12) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "nested_lists": "{{ [[[0] * 2000] * 2000] * (messages|length * 1000) }}",
    "replace": "{{ ('x' * 100000).replace('', '-' * (messages|length * 100000)) }}",
    "batch_fill": "{{ messages|batch(" + HUGE + ", 'x')|list|length }}",
    "sum_lists": "{{ ([['x'] * 1000000] * (messages|length * 2000))|sum(start=[])|length }}",
    "tojson_indent": "{{ messages|tojson(indent=" + HUGE + ") }}",
    # 3,000,000 lists from one message, 2,000,000 words from one call (the review: 20 s and 2 GB for
    # 'x'|slice(30000000); lipsum(200000) ran until the watchdog stopped it)
    "slice_filter": "{{ messages|slice(messages|length * 3000000)|list|length }}",
    "slice_filter_fill": "{{ messages|slice(messages|length * 3000000, 'x')|list|length }}",
    "slice_filter_string": "{{ messages[0].content|slice(messages|length * 3000000)|list|length }}",
    "slice_filter_map": "{{ messages|map(attribute='role')|slice(messages|length * 3000000)|list|length }}",
    "lipsum_paragraphs": "{{ lipsum(messages|length * 20000)|length }}",
    "lipsum_words": "{{ lipsum(messages|length * 2, min=1, max=messages|length * 1000000)|length }}",
    # bytes repeat, pad and join as strings do ('x'.encode() * 300000000: 300 MB, unsized)
    "bytes_times_int": "{{ ('x'.encode() * " + HUGE + ")|length }}",
    "int_times_bytes": "{{ (" + HUGE + " * 'x'.encode())|length }}",
    "bytes_ljust": "{{ 'x'.encode().ljust(" + HUGE + ")|length }}",
    "bytes_zfill": "{{ '7'.encode().zfill(" + HUGE + ")|length }}",
    "bytes_expandtabs": "{{ ('\t' * 1000).encode().expandtabs(" + HUGE + ")|length }}",
    "bytes_join": MEGA + "{{ mega.encode().join(['a'.encode()] * 4000)|length }}",
    "bytes_concat": MEGA + "{% set ns = namespace(s=mega.encode()) %}{% for i in range(12) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    # one string held 3,000 times by a dict, written out in one C call (16 s, 2.9 GB)
    "dict_fromkeys_string": MEGA + "{% set d = dict.fromkeys(range(3000), mega) %}{{ (d|string)|length }}",
    "dict_fromkeys_output": MEGA + "{% set d = dict.fromkeys(range(3000), mega) %}{{ d }}",
    "dict_fromkeys_concat": MEGA + "{% set d = dict.fromkeys(range(3000), mega) %}{{ (d ~ '')|length }}",
    "output": MEGA + "{% for i in range(4000) %}{{ mega }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(COMPUTED_SIZES))
def test_a_value_computed_from_the_data_is_sized_before_it_is_built(tmp_path, tiny_tokenizer_file, name):
    """Each is refused in one line naming the template and the fix, having allocated next to
    nothing: the size is checked before the value exists."""
    import tracemalloc

    from ds_sft.data.tokenizer import load_tokenizer

    template = COMPUTED_SIZES[name] + CHATML
    tokenizer = load_tokenizer(str(tokenizer_dir(tmp_path, tiny_tokenizer_file, template)))
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as info:
            templates.render_prompt({"id": "a:0", "instruction": "hi", "input": ""}, "chat", tokenizer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and message.startswith("a:0: the chat template of ")
    assert "would build" in message and "--template alpaca" in message
    assert peak < 64 << 20  # bytes: the 1 GiB value was never built
