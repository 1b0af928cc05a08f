"""The cross-check of ds-sft's GSM8K scoring against the harness's, on hand-made verdicts: which
problems differ and why (extraction, stop sequences / length, template), and whether the two
accuracies agree within their intervals. The task config keeps the harness's gsm8k semantics."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.eval import harness


def _ours(completion, predicted, correct, target="18", cut=False, question="How many dollars?"):
    return {"completion": completion, "predicted": predicted, "correct": correct, "target": target,
            "hit_max_new_tokens": cut, "question": question}  # fmt: skip


def _theirs(doc_id, filter_name, text, answer, right, question="How many dollars?"):
    return {"doc_id": doc_id, "filter": filter_name, "resps": [[text]], "filtered_resps": [answer],
            "exact_match": float(right), "doc": {"question": question, "answer": "#### 18"}}  # fmt: skip


def test_cross_check_names_each_difference_and_its_reason():
    ours = [
        _ours("She makes 9 * 2 = 18 dollars.", "18", True),  # 0: no '####': strict misses, flexible finds
        _ours("She makes 9 * 2 = 18 dollars. #### 18", "18", True),  # 1: the harness's text is cut shorter
        _ours("I think 20.", "20", False),  # 2: a different prompt, a different (right) answer there
        _ours("#### 18", "18", True),  # 3: both right
    ]
    doc_ids = [4, 9, 11, 12]
    texts = {
        4: "She makes 9 * 2 = 18 dollars.",
        9: "She makes 9 * 2 =",
        11: "Janet sells 9 eggs, so 18 dollars.\n#### 18",
        12: "#### 18",
    }
    strict = {4: ("[invalid]", False), 9: ("[invalid]", False), 11: ("18", True), 12: ("18", True)}
    flexible = {4: ("18", True), 9: ("2", False), 11: ("18", True), 12: ("18", True)}
    samples = [_theirs(d, "strict-match", texts[d], *strict[d]) for d in doc_ids]
    samples += [_theirs(d, "flexible-extract", texts[d], *flexible[d]) for d in doc_ids]

    strict_check, flexible_check = harness.cross_check("m", ours, doc_ids, samples)
    assert [d["index"] for d in strict_check["differences"]] == [4, 9, 11]
    reasons = [d["why"].split(":")[0] for d in strict_check["differences"]]
    assert reasons == ["extraction", "stop sequence / length", "template"]
    assert strict_check["differences"][0]["why"].startswith(
        "extraction: on the harness's completion ds-sft reads 18"
    )
    assert [d["index"] for d in flexible_check["differences"]] == [9, 11]
    assert (strict_check["ds_sft"]["correct"], strict_check["harness"]["correct"]) == (3, 2)
    assert strict_check["agree"] and "agree within their 95% intervals" in strict_check["summary"]
    assert strict_check["paired"]["only_a"] == 2 and strict_check["paired"]["only_b"] == 1


def test_intervals_that_do_not_overlap_are_a_disagreement():
    ours = [_ours("#### 18", "18", True) for _ in range(30)]
    samples = [_theirs(d, f, "no", "[invalid]", False) for d in range(30) for f in harness.GSM8K_FILTERS]
    check = harness.cross_check("m", ours, list(range(30)), samples)[0]
    assert not check["agree"] and "DISAGREE" in check["summary"] and check["paired"]["significant"]


def test_a_problem_the_harness_did_not_score_is_an_error():
    samples = [_theirs(0, f, "#### 18", "18", True) for f in harness.GSM8K_FILTERS]
    with pytest.raises(UserError, match="did not score"):
        harness.cross_check("m", [_ours("#### 18", "18", True)] * 2, [0, 1], samples)


def test_a_problem_the_harness_read_with_another_question_is_an_error():
    """Pairing by row number alone compared different problems and called them in agreement when the
    harness read another file (a --gsm8k_test path datasets took for a glob pattern)."""
    samples = [_theirs(0, f, "#### 18", "18", True, question="Other problem?") for f in harness.GSM8K_FILTERS]
    with pytest.raises(UserError, match=r"read other questions than ds-sft for problems \[0\]"):
        harness.cross_check("m", [_ours("#### 18", "18", True)], [0], samples)


def test_gsm8k_task_keeps_the_harness_semantics_on_local_data():
    """The same prompt, stops, filters and metric as the harness's own gsm8k.yaml; the data local."""
    lm_eval = pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    ours = harness.gsm8k_task_config("/data/test.jsonl", 99)
    for key in ("doc_to_text", "doc_to_target", "metric_list", "filter_list", "output_type", "test_split"):
        assert ours[key] == shipped[key], key
    assert ours["generation_kwargs"] == {**shipped["generation_kwargs"], "max_gen_toks": 99}
    assert ours["dataset_kwargs"] == {"data_files": {"test": "/data/test.jsonl"}} and ours["num_fewshot"] == 0


def test_unknown_harness_task_is_a_user_error():
    with pytest.raises(UserError, match="not fetched from the hub"):
        harness.task_configs(["hellaswag"], "/data/test.jsonl", 16)


def test_other_tasks_come_from_a_local_task_config_yaml(tmp_path, monkeypatch):
    """Any task besides gsm8k is a task config file naming local data; it is passed on as written,
    its data files as absolute paths."""
    import yaml

    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    config = {**harness.gsm8k_task_config("mine.jsonl", 32), "task": "my_arithmetic"}
    path = tmp_path / "my_arithmetic.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # a relative data file is relative to the working directory, as for datasets
    expected = {**config, "dataset_kwargs": {"data_files": {"test": [str(data)]}}}
    assert harness.task_configs([str(path)], None, 64) == [expected]
    with pytest.raises(UserError, match="--gsm8k_test"):
        harness.task_configs(["gsm8k"], None, 64)


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("datasets_offline", [None, "0", "1"])
@pytest.mark.parametrize("hub_offline", [None, "0", "1"])
def test_the_harness_runs_offline_and_leaves_the_process_setting_alone(
    hub_offline, datasets_offline, fails, monkeypatch
):
    """Offline inside the call whatever the caller's setting (the variables, and the attributes the
    libraries read them into when imported before); the caller's setting back after, also on error."""
    import datasets.config
    import huggingface_hub.constants
    import lm_eval
    import lm_eval.models.huggingface

    import ds_sft.model.export

    for name, value in (("HF_HUB_OFFLINE", hub_offline), ("HF_DATASETS_OFFLINE", datasets_offline)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    caller_online = (hub_offline or "0") == "0"  # as imported by a caller whose hub is online, or not
    attributes = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                  (datasets.config, "HF_DATASETS_OFFLINE")]  # fmt: skip
    for module, name in attributes:
        monkeypatch.setattr(module, name, not caller_online)
    before = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    seen = {}

    def simple_evaluate(**kwargs):
        seen["variables"] = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
        seen["attributes"] = [getattr(module, name) for module, name in attributes]
        if fails:
            raise RuntimeError("the harness failed")
        return {"results": {}, "samples": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: None)
    monkeypatch.setattr(ds_sft.model.export, "export_hf", lambda model, tokenizer, folder: None)
    model = SimpleNamespace(wte=SimpleNamespace(weight=torch.zeros(1)))

    def run():
        return harness.run_harness(
            model, None, [], samples=None, chat_template=False, batch_size=1, device="cpu"
        )

    if fails:
        with pytest.raises(
            UserError, match=r"the harness failed \(the harness failed\); fix the task config"
        ):
            run()
    else:
        assert run()["results"] == {}
    assert seen["variables"] == dict.fromkeys(OFFLINE_VARIABLES, "1")
    assert seen["attributes"] == [True, True, True]
    assert {name: os.environ.get(name) for name in OFFLINE_VARIABLES} == before
    assert [getattr(module, name) for module, name in attributes] == [not caller_online] * 3


def _task(tmp_path, **changes) -> dict:
    """A valid task config on a local file, with ``changes`` (None deletes a key)."""
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    config = {**harness.gsm8k_task_config(str(data), 32), "task": "mine", **changes}
    return {key: value for key, value in config.items() if value is not None}


ALIAS_BOMB = "task: x\nmetadata:\n  a0: &a0 [lol, lol, lol]\n" + "".join(
    f"  a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, 9)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task: [unclosed", "not a plain task config YAML"),
        ("task: x\nprocess_docs: !function utils.process", "not a plain task config YAML"),
        (ALIAS_BOMB, r"not a plain task config YAML \(an alias \(\*name\): write the value out"),
        ("- task: x", "a task config is a mapping with a task name"),
        ("dataset_path: json", "a task config is a mapping with a task name"),
    ],
)
def test_a_task_config_file_is_plain_yaml_or_one_line(tmp_path, text, message):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        harness.task_configs([str(path)], None, 16)
    assert "\n" not in str(err.value)


def test_a_task_config_over_a_mebibyte_is_refused_unread(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("task: x\n" + "# padding\n" * (harness.TASK_FILE_BYTES // 10))
    with pytest.raises(UserError, match="not a task config"):
        harness.task_configs([str(path)], None, 16)


EVIL_METRIC = "/tmp/evil/evil.py"
TASK_CHANGES = {  # what a task config may not hold, and the words that refuse it
    "include": ({"include": "other.yaml"}, "include would read other files or run code"),
    "group": ({"group": "mine"}, "group would read other files"),
    "class": ({"class": "mine.Task"}, "class would read other files"),
    "use_prompt": ({"use_prompt": "promptsource:*"}, "use_prompt would read other files or run code"),
    "unsafe_code": ({"unsafe_code": True}, "unsafe_code would"),
    "process_results": ({"process_results": "utils.score"}, "process_results would"),
    "custom_dataset": ({"custom_dataset": "utils.load"}, "custom_dataset would"),
    "unknown key": ({"doc_to_txet": "{{question}}"}, "unknown key 'doc_to_txet'"),
    "reserved name": ({"task": "gsm8k"}, "the task name 'gsm8k' is ds-sft's own"),
    "metric from a .py file": (
        {"metric_list": [{"metric": EVIL_METRIC, "aggregation": "mean"}]},
        "metric '/tmp/evil/evil.py' is not one of the harness's own",
    ),
    "metric typo": ({"metric_list": [{"metric": "exact_mtach"}]}, "metric 'exact_mtach' is not one"),
    "metric through HF evaluate": (
        {"metric_list": [{"metric": "exact_match", "hf_evaluate": True}]},
        "metric 'exact_match' is not one of the harness's own",
    ),
    "metric list of names": ({"metric_list": ["exact_match"]}, "metric_list is a list of mappings"),
    "aggregation typo": (
        {"metric_list": [{"metric": "exact_match", "aggregation": "avg"}]},
        "aggregation 'avg'",
    ),
    "custom filter": (
        {"filter_list": [{"name": "x", "filter": [{"function": "custom", "filter_fn": "os.system"}]}]},
        "filter function 'custom'",
    ),
    "unknown filter": (
        {"filter_list": [{"name": "x", "filter": [{"function": "rgx"}]}]},
        "filter function 'rgx'",
    ),
    "filter not a list": ({"filter_list": [{"name": "x", "filter": "regex"}]}, "filter_list is a list of"),
    "dataset from the hub": (
        {"dataset_path": "openai/gsm8k"},
        "dataset_path 'openai/gsm8k': tasks read local",
    ),
    "dataset from a script": ({"dataset_path": "/tmp/loader.py"}, "dataset_path '/tmp/loader.py'"),
    "cache_dir": (
        {"dataset_kwargs": {"data_files": "x.jsonl", "cache_dir": "/home"}},
        "dataset_kwargs holds",
    ),
    "remote code": (
        {"dataset_kwargs": {"data_files": "x", "trust_remote_code": True}},
        "dataset_kwargs holds",
    ),
    "no data files": ({"dataset_kwargs": {"field": "rows"}}, "dataset_kwargs holds data_files"),
    "missing data file": (
        {"dataset_kwargs": {"data_files": {"test": "nope.jsonl"}}},
        "nope.jsonl: no such file",
    ),
    "data file a folder": ({"dataset_kwargs": {"data_files": "/tmp"}}, "is a directory"),
    "data files a number": ({"dataset_kwargs": {"data_files": {"test": 5}}}, "data_files is a path"),
    # scoring that ran for hours on one short row: `(a+)+$` against 31 characters took 80 s
    "nested repeat to ignore": (
        {"metric_list": [{"metric": "exact_match", "regexes_to_ignore": [",", "(a+)+$"]}]},
        r"regexes_to_ignore '\(a\+\)\+\$': a repeat inside a repeat",
    ),
    "alternatives in a repeated filter pattern": (
        {"filter_list": [{"name": "x", "filter": [{"function": "regex", "regex_pattern": "(a|a)*b"}]}]},
        "regex_pattern '\\(a\\|a\\)\\*b': alternatives inside a repeat",
    ),
    "broken regex": (
        {"filter_list": [{"name": "x", "filter": [{"function": "regex", "regex_pattern": "(unclosed"}]}]},
        "not a regular expression",
    ),
    # generation past the model's length, and work multiplied per document
    "max_length": (
        {"generation_kwargs": {"until": ["Q:"], "max_length": 1500}},
        "generation_kwargs may hold",
    ),
    "max_gen_toks past the bound": (
        {"generation_kwargs": {"max_gen_toks": 10**9}},
        "generation_kwargs.max_gen_toks must be an integer from 1 to 65,536, got 1000000000",
    ),
    "repeats": ({"repeats": 10**6}, "repeats must be an integer from 1 to 16, got 1000000"),
    "few-shot": ({"num_fewshot": 10**9}, "num_fewshot must be an integer from 0 to 64, got 1000000000"),
    "until a number": ({"generation_kwargs": {"until": 5}}, "until is a string or a list of strings"),
}


@pytest.mark.parametrize("change", TASK_CHANGES)
def test_a_task_config_is_one_self_contained_task_or_one_line(tmp_path, change):
    """Each key through which a task config reached beyond itself (a metric named by a .py path ran
    that file through HF evaluate; datasets' cache_dir wrote anywhere) or failed only after the whole
    evaluation (a typo in a metric, a filter, a data file's name) is refused before any model loads."""
    import yaml

    pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    changes, message = TASK_CHANGES[change]
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(_task(tmp_path, **changes)))
    with pytest.raises(UserError, match=message) as err:
        harness.task_configs([str(path)], None, 16)
    assert "\n" not in str(err.value)


def test_harness_templates_render_in_the_sandbox_and_only_inside_the_block(tmp_path):
    lm_eval_utils = pytest.importorskip(
        "lm_eval.utils", reason="the harness is the optional extra ds-sft[eval]"
    )
    from jinja2.exceptions import SecurityError

    marker = tmp_path / "PWNED"
    attack = "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }}"
    template = "Question: {{ question | regex_replace('  +', ' ') }}\nAnswer:"
    doc = {"question": "2  +  2?"}
    plain = lm_eval_utils.env
    expected = lm_eval_utils.apply_template(template, doc)
    with harness.sandboxed_templates():
        assert lm_eval_utils.apply_template(template, doc) == expected == "Question: 2 + 2?\nAnswer:"
        with pytest.raises(SecurityError):
            lm_eval_utils.apply_template(attack, doc)
    assert lm_eval_utils.env is plain and not marker.exists()


def test_data_files_reach_the_harness_under_plain_names(tmp_path):
    """datasets reads a data file's path as a glob pattern: `g[1]/test.jsonl` loaded `g1/test.jsonl`,
    another file, and the cross-check compared different problems. Each file is linked in under a
    name without pattern characters, and datasets loads exactly its rows."""
    import json

    import datasets

    (tmp_path / "g[1]").mkdir()
    (tmp_path / "g1").mkdir()
    (tmp_path / "g[1]" / "test.jsonl").write_text(
        json.dumps({"question": "mine?", "answer": "#### 1"}) + "\n"
    )
    (tmp_path / "g1" / "test.jsonl").write_text(json.dumps({"question": "other?", "answer": "#### 2"}) + "\n")
    config = harness.gsm8k_task_config(str(tmp_path / "g[1]" / "test.jsonl"), 8)
    folder = tmp_path / "staged"
    folder.mkdir()
    [staged] = harness.staged_data_files([config], folder)
    [link] = staged["dataset_kwargs"]["data_files"]["test"]
    assert not set("*?[]{}") & set(link) and Path(link).resolve() == (tmp_path / "g[1]" / "test.jsonl")
    loaded = datasets.load_dataset(
        "json", data_files=staged["dataset_kwargs"]["data_files"], cache_dir=str(tmp_path / "c")
    )
    assert loaded["test"]["question"] == ["mine?"]
    assert config["dataset_kwargs"]["data_files"]["test"] == str(
        tmp_path / "g[1]" / "test.jsonl"
    )  # unchanged


HOSTILE_TEMPLATES = [  # one C call each, which neither the sandbox nor a timer could stop
    "{{ 'x' * 10**9 }}", "{{ 10**9 * 'x' }}", "{{ ['x'] * 10**9 }}", "{{ 9**999999 }}",
    "{{ 'x'.ljust(10**10) }}", "{{ 'x'.center(3000000000) }}", "{{ '1'.zfill(10**9) }}",
    "{{ 'a\\tb'.expandtabs(10**9) }}", "{{ 'x'|center(3000000000) }}", "{{ 'x\\ny'|indent(10**9) }}",
    "{{ '%999999999d' % 1 }}", "{{ '%*d' % (10**9, 1) }}", "{{ '%999999999s'|format('x') }}",
    "{{ '{:999999999}'.format(1) }}", "{{ '{:{}}'.format(1, 10**9) }}",
    "{{ (question * 4000).replace('', question * 4000) }}",
    "{{ (question * 4000)|replace('', question * 4000) }}",
]  # fmt: skip
BENIGN_TEMPLATES = {  # what real task configs write
    "{{ '-' * 20 }}": "-" * 20,
    "{{ 2 ** 10 }}": "1024",
    "{{ 7 % 2 }}": "1",
    "{{ '%s?' % question }}": "2  +  2??",
    "{{ question.replace('  ', ' ') }}": "2 + 2?",
    "{{ question|center(12) }}": "  2  +  2?  ",
    "{{ '{:>4}'.format(7) }}": "   7",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_a_task_template_cannot_build_a_huge_value(template):
    """The sandbox blocked attribute access but not arithmetic: `{{ 'x' * 10**9 }}` in doc_to_text
    built a 1 GB prompt per document (3.9 GB of memory, 22 s), 10**12 a MemoryError traceback."""
    lm_eval_utils = pytest.importorskip(
        "lm_eval.utils", reason="the harness is the optional extra ds-sft[eval]"
    )
    import resource

    from ds_sft.data.template_sandbox import TemplateOverSize

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with harness.sandboxed_templates(), pytest.raises(TemplateOverSize, match="would build"):
        lm_eval_utils.apply_template(template, {"question": "2  +  2?"})
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was built


@pytest.mark.parametrize("template", BENIGN_TEMPLATES)
def test_ordinary_task_templates_render_as_before(template):
    lm_eval_utils = pytest.importorskip(
        "lm_eval.utils", reason="the harness is the optional extra ds-sft[eval]"
    )
    with harness.sandboxed_templates():
        assert lm_eval_utils.apply_template(template, {"question": "2  +  2?"}) == BENIGN_TEMPLATES[template]


@pytest.mark.parametrize(
    "pattern",
    ["(a+)+$", "(x*)*", "(?:a+){2,}", "((ab)+c)+", "(a|a)*", "(?:\\d+\\s?)+$", "(?=(a+)+)b"],
)
def test_regexes_that_backtrack_exponentially_are_named(pattern):
    assert harness.regex_problem(pattern) is not None


def test_the_stock_gsm8k_regexes_and_plain_ones_pass():
    config = harness.gsm8k_task_config("test.jsonl", 16)
    patterns = [*config["metric_list"][0]["regexes_to_ignore"]]
    patterns += [
        step["regex_pattern"]
        for item in config["filter_list"]
        for step in item["filter"]
        if "regex_pattern" in step
    ]
    patterns += ["The answer is (\\-?[0-9\\.\\,]+)", "\\b[A-D]\\b", "(?i)yes|no", "a{2,5}b+"]
    assert {pattern: harness.regex_problem(pattern) for pattern in patterns} == dict.fromkeys(patterns)


def test_a_task_named_twice_or_no_task_is_one_line(tmp_path):
    import yaml

    pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(_task(tmp_path)))
    copy = tmp_path / "copy.yaml"
    copy.write_text(path.read_text())
    with pytest.raises(UserError, match="the task 'mine' is given twice"):
        harness.task_configs([str(path), str(copy)], None, 16)


SLOW_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ question }}",
    "{% for i in range(100000) %}{{ range(100000) | sum }}{% endfor %}",
]


@pytest.mark.parametrize("template", SLOW_TEMPLATES)
def test_a_task_template_that_renders_for_hours_is_stopped(monkeypatch, template):
    """Two nested loops over Jinja's largest range (100,000 each) rendered for hours per document:
    the size checks see no large value. A render runs under prepare's chat-template watchdog; an
    ordinary one is unaffected."""
    import time

    lm_eval_utils = pytest.importorskip(
        "lm_eval.utils", reason="the harness is the optional extra ds-sft[eval]"
    )
    from ds_sft.data import template_sandbox

    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with harness.sandboxed_templates(), pytest.raises(template_sandbox.TemplateOverTime):
        lm_eval_utils.apply_template(template, {"question": "2 + 2?"})
    assert time.monotonic() - start < 60  # stopped, not run to its end (hours)
    # the ordinary render must not race a limit a busy machine reaches
    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 600.0)
    with harness.sandboxed_templates():
        assert lm_eval_utils.apply_template("Q: {{ question }}", {"question": "2 + 2?"}) == "Q: 2 + 2?"


@pytest.mark.parametrize("stopped", ["TemplateOverTime", "TemplateOverMemory"])
def test_a_render_the_watchdog_stopped_is_one_line_naming_the_task_config(monkeypatch, stopped):
    pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    import lm_eval
    import lm_eval.models.huggingface

    import ds_sft.model.export
    from ds_sft.data import template_sandbox

    def simple_evaluate(**kwargs):
        raise getattr(template_sandbox, stopped)()

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: None)
    monkeypatch.setattr(ds_sft.model.export, "export_hf", lambda model, tokenizer, folder: None)
    model = SimpleNamespace(wte=SimpleNamespace(weight=torch.zeros(1)))
    spent = "ran over" if stopped == "TemplateOverTime" else "grew the process by over"
    with pytest.raises(UserError, match=rf"a task config's template {spent} .* rendering one document"):
        harness.run_harness(model, None, [], samples=None, chat_template=False, batch_size=1, device="cpu")
