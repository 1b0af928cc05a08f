"""The cross-check of ds-sft's GSM8K scoring against the harness's, on hand-made verdicts: which
problems differ and why (extraction, stop sequences / length, template), and whether the two
accuracies agree within their intervals. The task config keeps the harness's gsm8k semantics."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.eval import harness


def _ours(completion, predicted, correct, target="18", cut=False):
    return {"completion": completion, "predicted": predicted, "correct": correct, "target": target,
            "hit_max_new_tokens": cut}  # fmt: skip


def _theirs(doc_id, filter_name, text, answer, right):
    return {"doc_id": doc_id, "filter": filter_name, "resps": [[text]], "filtered_resps": [answer],
            "exact_match": float(right)}  # fmt: skip


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
    with pytest.raises(ValueError, match="did not score"):
        harness.cross_check("m", [_ours("#### 18", "18", True)] * 2, [0, 1], samples)


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


def test_other_tasks_come_from_a_local_task_config_yaml(tmp_path):
    """Any task besides gsm8k is a task config file naming local data; it is passed on as written."""
    import yaml

    config = {**harness.gsm8k_task_config(str(tmp_path / "mine.jsonl"), 32), "task": "my_arithmetic"}
    path = tmp_path / "my_arithmetic.yaml"
    path.write_text(yaml.safe_dump(config))
    assert harness.task_configs([str(path)], None, 64) == [config]
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
        with pytest.raises(RuntimeError, match="the harness failed"):
            run()
    else:
        assert run()["results"] == {}
    assert seen["variables"] == dict.fromkeys(OFFLINE_VARIABLES, "1")
    assert seen["attributes"] == [True, True, True]
    assert {name: os.environ.get(name) for name in OFFLINE_VARIABLES} == before
    assert [getattr(module, name) for module, name in attributes] == [not caller_online] * 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task: [unclosed", "not a task config YAML"),
        ("task: x\nprocess_docs: !function utils.process", "not a task config YAML"),
        ("- task: x", "a task config is a mapping with a task name"),
        ("dataset_path: json", "a task config is a mapping with a task name"),
        ("task: x\ninclude: other.yaml", "include would read other files or run their code"),
        ("task: x\ngroup: mine", "group would read other files"),
        ("task: x\nclass: mine.Task", "class would read other files"),
        ("task: x\ndataset_kwargs: {trust_remote_code: true}", "dataset_kwargs.trust_remote_code would"),
    ],
)
def test_a_task_config_is_one_self_contained_task_or_one_line(tmp_path, text, message):
    path = tmp_path / "task.yaml"
    path.write_text(text)
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
