"""``ds-sft eval --harness TASKS``: EleutherAI's lm-evaluation-harness on the same model, offline.

ds-sft scores GSM8K its own way (:mod:`ds_sft.eval.gsm8k`: the data dir's prompt template, greedy
until EOS / end of turn, the number after ``####`` else the last number). The field reports the
harness's ``gsm8k`` (``"Question: ...\\nAnswer:"``, greedy until ``Question:``, exact match after a
``strict-match`` regex on ``#### N`` or a ``flexible-extract`` of the last number). Running both on
the same model and the same problems shows whether our number is comparable with theirs, and where
it is not, why (:func:`cross_check`).

How it runs: the model is written in the Hugging Face layout (``ds-sft export``'s
:func:`~ds_sft.model.export.export_hf`) into a temporary folder and loaded by the harness's ``HFLM``
in this process. Nothing comes from the hub: ``gsm8k`` is the harness's own task config (prompt,
stops, filters, metric) with its data pointed at the local GSM8K test file, zero-shot (no train split
needed), the chat template applied when the data dir uses it; any other task is a path to a task
config YAML whose ``dataset_path`` / ``dataset_kwargs`` name local files (``dataset_path: json``,
``dataset_kwargs: {data_files: {test: /path/test.jsonl}}``). The harness version and every task
config go into ``eval.json``.

A task config is the user's file, and the harness renders its prompts (``doc_to_text``...) with a
plain Jinja environment, where ``{{ lipsum.__globals__['os'].system(...) }}`` runs a shell command.
So ds-sft reads it as data only (YAML without tags or aliases, one task, lm-eval's keys minus those
that reach beyond the file, registered metrics and filters, local data files: :func:`checked_task_config`)
and the harness renders in a sandbox that also sizes what a template builds (:func:`sandboxed_templates`).
Its regexes run on a clock (:func:`bounded_regexes`): a pattern can backtrack for hours on a long text.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.options import Int, checked

# The harness's gsm8k.yaml (lm-eval 0.4.x) with its data pointed at a local file, zero-shot.
GSM8K_FILTERS = ("strict-match", "flexible-extract")
# Offline switches of the libraries the harness drives: environment variables that each library reads
# once, when imported, into a module attribute (which is what it consults afterwards).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_ATTRIBUTES = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


@contextmanager
def offline():
    """The hub and ``datasets`` offline inside the block, whatever the caller's environment says, and
    exactly as they were after it, also on an error: the rest of the process (``eval``'s own steps, a
    test session, a notebook) keeps its own setting. Both the variables and the attributes read from
    them are set, since a library imported earlier no longer looks at the variables."""
    import importlib

    # imported before the variables change, so that a first import reads the caller's environment
    modules = {name: importlib.import_module(name) for name, _ in OFFLINE_ATTRIBUTES}
    saved_variables = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_attributes = {(module, name): getattr(modules[module], name) for module, name in OFFLINE_ATTRIBUTES}
    try:
        os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
        for module, name in OFFLINE_ATTRIBUTES:
            setattr(modules[module], name, True)
        yield
    finally:
        for name, value in saved_variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module, name), value in saved_attributes.items():
            setattr(modules[module], name, value)


def gsm8k_task_config(test_path: str, max_new_tokens: int) -> dict:
    """The harness's ``gsm8k`` task on a local GSM8K ``test.jsonl`` (question/answer rows)."""
    return {
        "task": "gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(test_path)}},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
            }
        ],
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_new_tokens,
        },
        "repeats": 1,
        "num_fewshot": 0,
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            },
        ],
        "metadata": {"version": 3.0},
    }


def task_configs(tasks: list[str], gsm8k_test: str | None, max_new_tokens: int) -> list[dict]:
    """``--harness`` names -> task config dicts: ``gsm8k`` (local data) or a task config YAML path."""
    configs = []
    for task in tasks:
        if task == "gsm8k":
            if gsm8k_test is None:
                raise UserError(
                    "--harness gsm8k needs the GSM8K test set as a local file (--gsm8k_test PATH)"
                )
            configs.append(gsm8k_task_config(gsm8k_test, max_new_tokens))
        elif Path(task).suffix in (".yaml", ".yml") and Path(task).is_file():
            configs.append(checked_task_config(task, read_task_yaml(Path(task))))
        else:
            raise UserError(
                f"--harness {task}: pass gsm8k or a task config .yaml whose data are local files "
                "(dataset_path: json, dataset_kwargs: {data_files: {test: PATH}}); tasks are not fetched "
                "from the hub"
            )
    names = [config["task"] for config in configs]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:  # the harness would keep one of them
        raise UserError(f"--harness: the task {twice!r} is given twice; name each task once")
    return configs


TASK_FILE_BYTES = 1 << 20  # a task config is a page of YAML


def read_task_yaml(path: Path):
    """The YAML document in ``path`` as plain data: no tags (the harness's ``!function`` imports
    Python), no aliases (nine nested ``&a [*a, *a, ...]`` lines make 10**10 list items from 1 kB)."""
    import yaml

    class PlainData(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "an alias (*name): write the value out", mark)
            return super().compose_node(parent, index)

    if path.stat().st_size > TASK_FILE_BYTES:
        raise UserError(f"--harness {path}: over {TASK_FILE_BYTES >> 20} MiB, not a task config")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=PlainData)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"--harness {path}: not a plain task config YAML ({first_line(err)})") from None


# What a task config may hold. It is read as data: its prompts are Jinja templates (rendered in the
# sandbox), its data local files read by a packaged datasets builder, its scoring the harness's
# registered metrics and filters. Anything that reaches beyond the file is refused: other YAML files
# (include), groups, a task class, Python (process_docs, process_results, custom_dataset and the
# custom filter take functions), promptsource's templates (use_prompt), code execution (unsafe_code),
# and a metric loaded by name through HF evaluate, which imports any local .py file it is given.
REFUSED_TASK_KEYS = (
    "include", "group", "class", "custom_dataset", "process_docs", "process_results", "use_prompt",
    "unsafe_code",
)  # fmt: skip
DATASET_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
DATASET_KWARGS = ("data_files", "field")
RESERVED_TASKS = ("gsm8k",)  # ds-sft's own config of it, cross-checked against ds-sft's scores


def checked_task_config(task: str, config) -> dict:
    """``config`` (one task config YAML, parsed) when it is plain data for one task, else one line
    naming what to change. The data files are resolved to absolute paths of regular files."""
    from dataclasses import fields

    from lm_eval.api.task import TaskConfig

    where = f"--harness {task}"

    def refuse(why: str):
        raise UserError(f"{where}: {why}")

    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        refuse("a task config is a mapping with a task name (task: NAME)")
    if config["task"] in RESERVED_TASKS:
        refuse(
            f"the task name {config['task']!r} is ds-sft's own (--harness {config['task']}): rename the task"
        )
    reaching = [key for key in REFUSED_TASK_KEYS if key in config]
    if reaching:
        refuse(f"{', '.join(reaching)} would read other files or run code; pass one self-contained task")
    known = {field.name for field in fields(TaskConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        refuse(f"unknown key {unknown[0]!r}; a task config's keys are lm-eval's TaskConfig fields")
    _check_scoring(config, refuse)
    _check_generation(config, where, refuse)
    return {**config, "dataset_kwargs": _checked_data(config, refuse)}


# What a task may ask of generation: greedy or sampled answers up to max_gen_toks tokens (the harness
# keeps those within the model's length), stopped at ``until``. max_length and max_new_tokens went
# to generate() unchecked (1,490 tokens from a 512-token model), and repeats and num_fewshot multiply
# the work of every document.
GENERATION_KEYS = ("until", "do_sample", "temperature", "max_gen_toks")
MAX_GEN_TOKS = Int(1, 1 << 16)
REPEATS = Int(1, 16)
FEWSHOT = Int(0, 64)


def _check_generation(config: dict, where: str, refuse) -> None:
    kwargs = config.get("generation_kwargs", {})
    if not isinstance(kwargs, dict) or set(kwargs) - set(GENERATION_KEYS):
        refuse(f"generation_kwargs may hold {', '.join(GENERATION_KEYS)} only: got {kwargs!r:.200}")
    until = kwargs.get("until", [])
    if not (isinstance(until, str) or (isinstance(until, list) and all(isinstance(s, str) for s in until))):
        refuse("generation_kwargs.until is a string or a list of strings")
    checked(f"{where}: generation_kwargs.max_gen_toks", kwargs.get("max_gen_toks", 1), MAX_GEN_TOKS)
    checked(f"{where}: repeats", config.get("repeats", 1), REPEATS)
    checked(f"{where}: num_fewshot", config.get("num_fewshot", 0), FEWSHOT)


def _check_scoring(config: dict, refuse) -> None:
    """Metrics, aggregations and filters are names the harness has registered."""
    import lm_eval.api.metrics  # noqa: F401  (fills the registries)
    import lm_eval.filters  # noqa: F401
    from lm_eval.api.registry import aggregation_registry, filter_registry, metric_registry

    metrics = config.get("metric_list", [])
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        refuse("metric_list is a list of mappings (- metric: exact_match)")
    for metric in metrics:
        name = metric.get("metric")
        if not isinstance(name, str) or name not in metric_registry or metric.get("hf_evaluate"):
            own = ", ".join(sorted(metric_registry))
            refuse(f"metric {name!r} is not one of the harness's own ({own}); other metrics load code")
        aggregation = metric.get("aggregation", "mean")
        if not isinstance(aggregation, str) or aggregation not in aggregation_registry:
            refuse(f"aggregation {aggregation!r}: choose one of {', '.join(sorted(aggregation_registry))}")
    filters = config.get("filter_list", [])
    if not isinstance(filters, list) or not all(
        isinstance(item, dict) and isinstance(item.get("filter"), list) for item in filters
    ):
        refuse("filter_list is a list of {name: NAME, filter: [{function: NAME, ...}, ...]}")
    allowed = sorted(name for name in filter_registry if name != "custom")
    for step in (step for item in filters for step in item["filter"]):
        function = step.get("function") if isinstance(step, dict) else None
        if not isinstance(function, str) or function not in allowed:
            refuse(f"filter function {function!r}: choose one of {', '.join(allowed)}")
    for where in [*metrics, *(step for item in filters for step in item["filter"])]:
        for key, value in where.items():
            if "regex" in key:  # regexes_to_ignore, regex_pattern...: run on data and on model output
                for pattern in (
                    [value] if isinstance(value, str) else value if isinstance(value, list) else []
                ):
                    problem = regex_problem(pattern)
                    if problem:
                        refuse(f"{key} {pattern!r:.80}: {problem}")


MAX_PATTERN_CHARS = 512


def regex_problem(pattern) -> str | None:
    """Why the harness should not run ``pattern`` (Python's backtracking ``re``) on text it does not
    control, or None. Refused: what does not compile, and the shapes whose time grows exponentially
    with the text: a repeat inside a repeat (``(a+)+$``, ``(x*)*``) and alternatives inside one
    (``(a|a)*``). ``(a+)+$`` against 31 characters took 80 s; each more character doubles it."""
    import re
    from re import _constants as constants
    from re import _parser as parser

    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        return f"a regex is a string of at most {MAX_PATTERN_CHARS} characters"
    try:
        parsed = parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        return f"not a regular expression ({first_line(err)})"
    repeats = (constants.MAX_REPEAT, constants.MIN_REPEAT, constants.POSSESSIVE_REPEAT)

    def inside(items, in_repeat: bool) -> str | None:
        for op, argument in items:
            if op in repeats:
                low, high, sub = argument
                repeating = high > 1
                if in_repeat and repeating:
                    return "a repeat inside a repeat backtracks exponentially: write it with one quantifier"
                found = inside(sub, in_repeat or repeating)
            elif op is constants.BRANCH:
                if in_repeat:
                    return "alternatives inside a repeat backtrack exponentially: use a character class"
                found = next(filter(None, (inside(branch, in_repeat) for branch in argument[1])), None)
            elif op is constants.SUBPATTERN:
                found = inside(argument[-1], in_repeat)
            elif op in (constants.ASSERT, constants.ASSERT_NOT):
                found = inside(argument[1], in_repeat)
            else:
                found = None
            if found:
                return found
        return None

    return inside(parsed, False)


def _checked_data(config: dict, refuse) -> dict:
    """``dataset_kwargs`` with every data file an absolute path of a regular file."""
    from ds_sft.safe_read import require_regular_file

    if config.get("dataset_path") not in DATASET_BUILDERS:
        refuse(
            f"dataset_path {config.get('dataset_path')!r}: tasks read local files through one of "
            f"{', '.join(DATASET_BUILDERS)} (dataset_path: json, dataset_kwargs: {{data_files: PATH}})"
        )
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs or set(kwargs) - set(DATASET_KWARGS):
        refuse(f"dataset_kwargs holds data_files (and optionally field), nothing else: got {kwargs!r:.200}")
    files = kwargs["data_files"]
    by_split = files if isinstance(files, dict) else {"train": files}
    checked = {}
    for split, paths in by_split.items():
        names = [paths] if isinstance(paths, str) else paths
        if not isinstance(split, str) or not isinstance(names, list) or not names:
            refuse("data_files is a path, a list of paths, or {split: path(s)}")
        resolved = []
        for name in names:
            if not isinstance(name, str) or not name.strip():
                refuse(f"data_files: {name!r} is not a path")
            try:
                require_regular_file(Path(name), "task data")
            except UserError as err:
                refuse(str(err))
            resolved.append(str(Path(name).resolve()))
        checked[split] = resolved
    return {**kwargs, "data_files": checked if isinstance(files, dict) else checked["train"]}


def staged_data_files(configs: list[dict], folder: Path) -> list[dict]:
    """``configs`` with each data file given to the harness as a link of a plain name in ``folder``:
    ``datasets`` reads a data file's path as a glob pattern, so ``g[1]/test.jsonl`` scored
    ``g1/test.jsonl`` (another file, silently) and ``gsm8k [clean]/test.jsonl`` matched nothing."""
    staged = []
    for index, config in enumerate(configs):
        files = config["dataset_kwargs"]["data_files"]
        by_split = files if isinstance(files, dict) else {"train": files}
        links = {}
        for split, paths in by_split.items():
            links[split] = []
            for number, path in enumerate([paths] if isinstance(paths, str) else paths):
                link = folder / f"task{index}-{len(links)}-{number}{Path(path).suffix}"
                link.symlink_to(Path(path).resolve())
                links[split].append(str(link))
        data_files = links if isinstance(files, dict) else links["train"]
        staged.append({**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": data_files}})
    return staged


@contextmanager
def sandboxed_templates():
    """The harness renders task templates in Jinja's sandbox inside the block (its module-level
    environment is a plain one, in which a template can call any Python), with the same options and
    filters, what it builds sized first (:mod:`ds_sft.data.template_sandbox`); the plain one is back
    after it."""
    import lm_eval.utils

    from ds_sft.data.template_sandbox import bounded_sandbox_class

    plain = lm_eval.utils.env
    sandbox = bounded_sandbox_class()(loader=plain.loader, undefined=plain.undefined)
    sandbox.keep_trailing_newline = plain.keep_trailing_newline
    sandbox.filters.update(plain.filters)
    sandbox.filters.update(sandbox.sized_filters(plain.filters))
    lm_eval.utils.env = sandbox
    try:
        yield
    finally:
        lm_eval.utils.env = plain


@contextmanager
def bounded_regexes():
    """Every module of the harness matches with one :class:`~ds_sft.eval.bounded_re.BoundedRe` (a
    clock on each match) inside the block, and with ``re`` after it. The modules that take a task
    config's patterns (filters, metrics, the template filter ``regex_replace``) are imported first,
    since a module imported inside the block would bind ``re`` itself."""
    import re
    import sys

    import lm_eval.api.metrics  # noqa: F401  (regexes_to_ignore)
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.filters  # noqa: F401  (regex filters)
    import lm_eval.utils  # noqa: F401  (regex_replace)

    from ds_sft.eval.bounded_re import BoundedRe

    bounded = BoundedRe()
    modules = [
        module
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "lm_eval" and getattr(module, "re", None) is re
    ]
    for module in modules:
        module.re = bounded
    try:
        yield
    finally:
        for module in modules:
            module.re = re


def version() -> str:
    try:
        from importlib.metadata import version as installed

        return installed("lm_eval")
    except Exception as err:
        raise UserError(
            "--harness needs EleutherAI's lm-evaluation-harness: pip install 'ds-sft[eval]' (lm-eval)"
        ) from err


def run_harness(
    model,
    tokenizer,
    configs: list[dict],
    *,
    samples: dict[str, list[int]] | None,
    chat_template: bool,
    batch_size: int,
    device,
) -> dict:
    """Run the harness on ``model`` (a ``LlamaModel``) through a temporary HF export.

    ``samples``: per task, the document indices to score (the same GSM8K problems ds-sft scored).
    Returns the harness's results (``results``, ``samples`` per task) and its version.
    """
    harness_version = version()
    from jinja2.exceptions import SecurityError

    from ds_sft.data.template_sandbox import (
        TemplateOverMemory,
        TemplateOverSize,
        TemplateOverTime,
        over_budget,
    )
    from ds_sft.eval.bounded_re import RegexOverTime
    from ds_sft.model.export import export_hf

    names = ", ".join(config["task"] for config in configs)
    # offline: the data are local files by construction
    with (
        offline(),
        sandboxed_templates(),
        bounded_regexes(),
        tempfile.TemporaryDirectory(prefix="ds_sft_harness_") as folder,
    ):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        export_hf(model, tokenizer, Path(folder) / "model")
        data = Path(folder) / "data"
        data.mkdir()
        lm = HFLM(
            pretrained=str(Path(folder) / "model"),
            device=str(device),
            batch_size=batch_size,
            dtype=model.wte.weight.dtype,
        )
        try:
            output = simple_evaluate(
                model=lm,
                tasks=staged_data_files(configs, data),
                samples=samples,
                apply_chat_template=chat_template,
                log_samples=True,
                bootstrap_iters=0,
            )
        except SecurityError as err:
            raise UserError(
                f"--harness: a task config's template reaches outside its data ({first_line(err)}); "
                "templates render in Jinja's sandbox: fix the task config"
            ) from None
        except (TemplateOverTime, TemplateOverMemory, TemplateOverSize) as err:
            raise UserError(
                f"--harness: a task config's template {over_budget(err)} rendering one document: fix "
                "the task config"
            ) from None
        except RegexOverTime as err:
            raise UserError(f"--harness {names}: {err}") from None
        except Exception as err:  # the user's task config, met by the harness's many libraries
            raise UserError(
                f"--harness {names}: the harness failed ({first_line(err)}); fix the task config"
            ) from None
    return {"version": harness_version, "results": output["results"], "samples": output["samples"]}


def harness_scores(label: str, output: dict) -> list[dict]:
    """One row per (task, filter) of 0/1 per-problem metrics: accuracy with its n and Wilson interval."""
    from ds_sft.eval.stats import accuracy_summary

    rows = []
    for task, samples in output["samples"].items():
        by_key: dict[tuple[str, str], list[float]] = {}
        for sample in samples:
            for metric in sample.get("metrics", []):
                by_key.setdefault((sample.get("filter", "none"), metric), []).append(float(sample[metric]))
        for (filter_name, metric), values in by_key.items():
            if all(value in (0.0, 1.0) for value in values):
                summary = accuracy_summary(int(sum(values)), len(values))
                rows.append({"label": label, "task": task, "metric": f"{metric} ({filter_name})", **summary})
    return rows


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _why(ds_sample: dict, harness_text: str, harness_answer: str, harness_right: bool) -> str:
    """Why ds-sft and the harness disagree on one problem: extraction, stops/length, or the prompt."""
    from ds_sft.eval.gsm8k import extract_answer, number_text, parse_number

    ours_on_theirs = extract_answer(harness_text)
    ours_right_on_theirs = ours_on_theirs is not None and ours_on_theirs == parse_number(ds_sample["target"])
    if ours_right_on_theirs != harness_right:
        read = None if ours_on_theirs is None else number_text(ours_on_theirs)
        return (
            f"extraction: on the harness's completion ds-sft reads {read}, the harness's filter "
            f"{harness_answer!r}"
        )
    ours, theirs = _normalized(ds_sample["completion"]), _normalized(harness_text)
    if ours and theirs and (ours.startswith(theirs) or theirs.startswith(ours)):
        return "stop sequence / length: one completion is the other cut shorter"
    if ds_sample.get("hit_max_new_tokens"):
        return "length: ds-sft's completion hit max_new_tokens; different prompt template, different text"
    return "template: different prompts (data-dir template vs 'Question: ... Answer:'), different answers"


def cross_check(
    label: str, ds_samples: list[dict], doc_ids: list[int], harness_samples: list[dict]
) -> list[dict]:
    """ds-sft's GSM8K verdicts against the harness's (per filter) on the same problems.

    ``ds_samples[i]`` is ds-sft's sample for test-file row ``doc_ids[i]``. Per filter: both
    accuracies with Wilson intervals, whether the intervals overlap ("agree"), the exact paired
    test, and every problem scored differently with the likely reason.
    """
    from ds_sft.eval.stats import accuracy_summary, format_accuracy, paired_comparison

    checks = []
    for filter_name in GSM8K_FILTERS:
        theirs = {s["doc_id"]: s for s in harness_samples if s.get("filter") == filter_name}
        missing = [d for d in doc_ids if d not in theirs]
        if missing:
            raise UserError(
                f"--harness gsm8k: the harness did not score problems {missing[:5]} ({filter_name})"
            )
        other = [
            d
            for d, s in zip(doc_ids, ds_samples, strict=True)
            if theirs[d].get("doc", {}).get("question") != s["question"]
        ]
        if other:
            raise UserError(
                f"--harness gsm8k: the harness read other questions than ds-sft for problems {other[:5]}; "
                "the cross-check would compare different problems"
            )
        ours_right = [bool(s["correct"]) for s in ds_samples]
        theirs_right = [bool(theirs[d]["exact_match"]) for d in doc_ids]
        ours_acc, theirs_acc = (accuracy_summary(sum(r), len(r)) for r in (ours_right, theirs_right))
        overlap = (
            ours_acc["ci95"][0] <= theirs_acc["ci95"][1] and theirs_acc["ci95"][0] <= ours_acc["ci95"][1]
        )
        paired = paired_comparison(ours_right, theirs_right, ("ds-sft", f"harness {filter_name}"))
        differences = []
        for index, (doc_id, sample, right) in enumerate(zip(doc_ids, ds_samples, theirs_right, strict=True)):
            if bool(sample["correct"]) == right:
                continue
            harness = theirs[doc_id]
            text, answer = harness["resps"][0][0], str(harness["filtered_resps"][0])
            differences.append(
                {
                    "index": doc_id,
                    "position": index,
                    "ds_sft": f"{'right' if sample['correct'] else 'wrong'} ({sample['predicted']})",
                    "harness": f"{'right' if right else 'wrong'} ({answer})",
                    "why": _why(sample, text, answer, right),
                }
            )
        verdict = "agree within their 95% intervals" if overlap else "DISAGREE: the intervals do not overlap"
        checks.append(
            {
                "label": f"{label}, {filter_name}",
                "filter": filter_name,
                "ds_sft": ours_acc,
                "harness": theirs_acc,
                "agree": overlap,
                "paired": paired,
                "differences": differences,
                "summary": (
                    f"ds-sft {format_accuracy(ours_acc)} vs harness {filter_name} "
                    f"{format_accuracy(theirs_acc)}: {verdict}; {paired['summary']}"
                ),
            }
        )
    return checks
