"""``ds-sft eval`` end to end on a tiny model and a tiny prepared data dir.

The val loss is checked against the model's own summed loss (the fused-kernel path the trainer
uses), so per-source bookkeeping and chunked logits must add up to the same number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.eval import cli
from ds_sft.eval.prompts import FIXED_PROMPTS
from ds_sft.eval.report import CHART_NAME
from ds_sft.model.checkpoint import save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.run_layout import RUN_SIGNS
from tests.data.test_output_dir import snapshot


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, gpt2_tokenizer_dir):
    """Alpaca + GSM8K rows prepared with the GPT-2 tokenizer into 128-token packed rows."""
    from ds_sft.data import prepare

    root = tmp_path_factory.mktemp("eval_data")
    alpaca = root / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {
                    "instruction": f"Name a colour number {i}.",
                    "input": "",
                    "output": f"Colour {i} is blue {i}.",
                }
                for i in range(40)
            ]
        )
    )
    gsm8k = _write_jsonl(
        root / "gsm8k.jsonl",
        [
            {"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(40)
        ],
    )
    test = _write_jsonl(
        root / "test.jsonl",
        [
            {"question": f"A farmer has {i} cows and buys 3 more. How many?", "answer": f"#### {i + 3}"}
            for i in range(6)
        ],
    )
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    out = root / "data"
    args = parser.parse_args(
        [
            "--alpaca",
            str(alpaca),
            "--gsm8k",
            str(gsm8k),
            "--gsm8k_test",
            str(test),
            "--tokenizer",
            str(gpt2_tokenizer_dir),
            "--seq_len",
            "128",
            "--val_fraction",
            "0.25",
            "--output_dir",
            str(out),
        ]
    )
    prepare.run(args)
    return out, test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.preset("tiny", vocab_size=50304, max_seq_len=512))
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny")


def _independent_val_loss(model_path, data_path):
    """Mean token loss over the val split through the model's own ``labels=`` loss."""
    from ds_sft.data.shards import PackedDataset
    from ds_sft.model.checkpoint import load_model

    model = load_model(str(model_path), dtype=torch.float32)
    dataset = PackedDataset(data_path, "val")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            row = {k: v[None] for k, v in dataset[i].items()}
            total += model(
                row["input_ids"], row["position_ids"], row["document_ids"], labels=row["labels"]
            ).item()
            tokens += int((row["labels"] != -100).sum())
    return total / tokens, tokens


def test_eval_writes_every_measure(data_dir, model_dir, tmp_path, capsys):
    data_path, test = data_dir
    out = tmp_path / "eval"
    args = _parse(
        [
            "--model",
            str(model_dir),
            "--data_dir",
            str(data_path),
            "--gsm8k_test",
            str(test),
            "--gsm8k_limit",
            "4",
            "--max_new_tokens",
            "4",
            "--batch_size",
            "3",
            "--generate_batch_size",
            "3",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    assert cli.run(args) == 0

    report = json.loads((out / "eval.json").read_text())
    (result,) = report["models"]
    val = result["val"]
    loss, tokens = _independent_val_loss(model_dir, data_path)
    assert val["overall"]["tokens"] == tokens
    assert val["overall"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert set(val["by_source"]) == {"alpaca", "gsm8k"}
    assert sum(m["tokens"] for m in val["by_source"].values()) == tokens
    assert val["overall"]["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)

    assert result["gsm8k"]["total"] == 4 and len(result["gsm8k"]["samples"]) == 4
    assert [g["name"] for g in result["generations"]] == [p.name for p in FIXED_PROMPTS]
    assert report["template"] == "alpaca" and report["gsm8k_test"] == str(test)
    md = (out / "eval.md").read_text()
    assert "| overall |" in md and "GSM8K" in md and (out / "val_loss_by_source.png").is_file()

    # each measure shows its progress on stderr, to its last row, problem or prompt
    bars = capsys.readouterr().err
    for name, total in (("val", val["rows"]), ("gsm8k", 4), ("fixed prompts", len(FIXED_PROMPTS))):
        assert re.search(rf"{name}: 100%\|[^\r\n]*\| {total}/{total} ", bars), (name, bars)


def test_compare_puts_a_model_and_a_run_dir_side_by_side(data_dir, model_dir, tmp_path):
    from ds_sft.model.checkpoint import load_model

    data_path, _ = data_dir
    run_dir = tmp_path / "run"  # what `ds-sft train` leaves: RUN/final/ in the save_model layout
    save_model(load_model(str(model_dir)), run_dir / "final")
    out = tmp_path / "compare"
    args = _parse(
        [
            "--compare",
            str(model_dir),
            str(run_dir),
            "--data_dir",
            str(data_path),
            "--no_gsm8k",
            "--no_generate",
            "--val_rows",
            "2",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    assert cli.run(args) == 0
    first, second = json.loads((out / "eval.json").read_text())["models"]
    assert (first["label"], second["label"]) == ("tiny", "run")
    assert first["val"] == second["val"] and first["val"]["rows"] == 2  # the same weights
    assert first["gsm8k"] is None and first["generations"] is None
    assert "| loss tiny | loss run |" in (out / "eval.md").read_text()


def test_model_with_a_smaller_vocabulary_is_refused(data_dir, tmp_path):
    data_path, _ = data_dir
    small = save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "small")
    args = _parse(["--model", str(small), "--data_dir", str(data_path), "--no_gsm8k", "--no_generate"])
    with pytest.raises(UserError, match="256-token vocabulary"):
        cli.run(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data_dir", "/nonexistent"], "ds-sft prepare"),
    ],  # numbers out of their domain stop in the parser: tests/reliability/test_fuzz_config.py
)
def test_bad_arguments_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        cli.run(_parse(["--model", "x", *argv]))


@pytest.mark.parametrize("kind", ["file", "fifo", "link to a file"])
def test_a_data_dir_that_is_not_a_folder_is_called_that(tmp_path, kind):
    """It was "does not exist", of a path that plainly does."""
    path = tmp_path / "data"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "file").write_text("{}")
        path.symlink_to(tmp_path / "file") if kind.startswith("link") else path.write_text("{}")
    with pytest.raises(UserError, match=f"--data_dir {re.escape(str(path))} is not a folder"):
        cli.run(_parse(["--model", "x", "--data_dir", str(path)]))


NOT_DEVICES = ["mps", "xla", "meta", "bogus", "cuda:", "cuda:-1", "cpu:3", "CUDA", "cuda:1a"]
NOT_DEVICES += ["cuda:12345", "cuda 0", "cuda:0,1"]


@pytest.mark.parametrize("device", NOT_DEVICES)
def test_a_device_ds_sft_does_not_run_on_stops_in_the_parser(device, capsys):
    """torch's own parser took these and failed later with a traceback (or, for meta, mid-eval)."""
    from ds_sft.command import main_for

    with pytest.raises(SystemExit) as exited:
        main_for("eval", ["--model", "x", "--data_dir", "d", "--device", device])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert "argument --device: must be cpu, cuda or cuda:N" in err


@pytest.mark.parametrize(
    ("name", "gpus", "expected"),
    [
        (None, 0, "cpu"),
        (None, 2, "cuda"),
        ("cpu", 2, "cpu"),
        ("cuda", 1, "cuda"),
        ("cuda:1", 2, "cuda:1"),
        ("cuda", 0, "torch sees no CUDA device"),
        ("cuda:0", 0, "torch sees no CUDA device"),
        ("cuda:2", 2, "has 2 CUDA device(s): cuda:0 to cuda:1"),
        ("cuda:9999", 8, "has 8 CUDA device(s)"),
    ],
)
def test_the_device_is_one_this_machine_has(monkeypatch, name, gpus, expected):
    """Before, --device cuda on a machine without a GPU ended in torch's AssertionError traceback."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if expected.startswith(("cpu", "cuda")):
        assert cli.available_device(name) == torch.device(expected)
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            cli.available_device(name)


def test_labels_name_run_dirs_not_final():
    assert cli._labels(["smollm2-135m-instruct", "runs/sft/final"]) == ["smollm2-135m-instruct", "sft"]
    assert cli._labels(["a/m", "b/m"]) == ["A:m", "B:m"]


def test_compare_says_whether_the_gsm8k_difference_is_significant(data_dir, tmp_path, monkeypatch, capsys):
    """The demo's case, 1/10 for the base model and 0/10 after fine-tuning on the same problems:
    intervals in the table and the paired test's verdict, in eval.md, eval.json and on stdout."""
    from ds_sft.data import model_match
    from ds_sft.eval import evaluate
    from ds_sft.eval.stats import accuracy_summary

    def fake_evaluate_model(spec, data, problems, **kwargs):
        right = 1 if spec == "base" else 0
        samples = [{"correct": i < right, "hit_max_new_tokens": False} for i in range(10)]
        gsm8k = {**accuracy_summary(right, 10), "hit_max_new_tokens": 0, "samples": samples}
        return {"parameters": 1, "val": None, "gsm8k": gsm8k, "generations": None, "seconds": {}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    monkeypatch.setattr(evaluate, "load_checked_model", lambda spec, *args, **kwargs: None)  # no model files
    monkeypatch.setattr(cli, "resolve_model_path", lambda spec: tmp_path / spec)
    monkeypatch.setattr(model_match, "check_tokenizer", lambda spec, data_dir, path: None)
    monkeypatch.setattr(model_match, "check_template", lambda spec, data_dir, path: None)
    data_path, test = data_dir
    out = tmp_path / "compare"
    argv = ["--compare", "base", "sft", "--data_dir", str(data_path), "--gsm8k_test", str(test)]
    assert cli.run(_parse([*argv, "--no_val", "--no_generate", "--out", str(out)])) == 0
    md = (out / "eval.md").read_text()
    assert "| base | 10.0% | 1/10 | 1.8% - 40.4% |" in md and "| sft | 0.0% | 0/10 | 0.0% - 27.8% |" in md
    assert "exact McNemar p = 1: not significant at 5%" in md
    paired = json.loads((out / "eval.json").read_text())["gsm8k_paired"]
    assert (paired["only_a"], paired["only_b"], paired["significant"]) == (1, 0, False)
    assert "not significant" in capsys.readouterr().out
    # what `make demo` prints last
    from ds_sft.demo import gsm8k_lines

    assert gsm8k_lines(out / "eval.json") == [
        "GSM8K base: 10.0% (1/10, 95% CI 1.8%-40.4%)",
        "GSM8K sft: 0.0% (0/10, 95% CI 0.0%-27.8%)",
        f"GSM8K paired: {paired['summary']}",
    ]


def test_harness_gsm8k_runs_offline_on_the_same_problems_and_cross_checks(data_dir, model_dir, tmp_path):
    """``--harness gsm8k`` on a slice of a local test file, tiny random model: the harness scores
    exactly ds-sft's problems, its version and task config are recorded, and the cross-check lists
    every problem the two score differently."""
    pytest.importorskip(
        "lm_eval", reason="the harness is the optional extra ds-sft[eval] (pip install lm-eval)"
    )
    from importlib.metadata import version

    from ds_sft.eval.gsm8k import select_indices

    data_path, test = data_dir
    out = tmp_path / "harness"
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--gsm8k_test", str(test)]
    options = ["--gsm8k_limit", "3", "--max_new_tokens", "6", "--harness", "gsm8k", "--dtype", "float32"]
    assert cli.run(_parse([*argv, *options, "--no_val", "--no_generate", "--out", str(out)])) == 0

    report = json.loads((out / "eval.json").read_text())
    harness = report["harness"]
    assert harness["version"] == version("lm_eval")
    (config,) = harness["task_configs"]
    assert config["dataset_kwargs"]["data_files"]["test"] == str(test) and config["num_fewshot"] == 0
    (result,) = report["models"]
    doc_ids = select_indices(6, 3, 0)
    scored = result["harness"]["samples"]["gsm8k"]
    assert sorted({s["doc_id"] for s in scored}) == doc_ids
    assert [c["filter"] for c in harness["cross_check"]] == ["strict-match", "flexible-extract"]
    ours = [s["correct"] for s in result["gsm8k"]["samples"]]
    for check in harness["cross_check"]:
        theirs = {s["doc_id"]: bool(s["exact_match"]) for s in scored if s["filter"] == check["filter"]}
        differing = [d for d, right in zip(doc_ids, ours, strict=True) if theirs[d] != right]
        assert [d["index"] for d in check["differences"]] == differing
        assert check["harness"]["correct"] == sum(theirs.values()) and check["ds_sft"]["total"] == 3
    assert "lm-evaluation-harness" in (out / "eval.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--harness", "gsm8k", "--no_gsm8k"], "--harness gsm8k scores the same problems"),
        (["--harness", "hellaswag"], "tasks are not fetched from the hub"),
        (["--harness", " , "], "--harness ' , ' names no task"),  # ran no harness, without a word
        (["--harness", "gsm8k,gsm8k"], "the task 'gsm8k' is given twice"),
    ],
)
def test_bad_eval_options_are_user_errors(data_dir, argv, message):
    if "hellaswag" in argv or "gsm8k,gsm8k" in argv:
        pytest.importorskip("lm_eval", reason="the harness is the optional extra ds-sft[eval]")
    data_path, test = data_dir
    base = ["--model", "x", "--data_dir", str(data_path), "--gsm8k_test", str(test)]
    with pytest.raises(UserError, match=message):
        cli.run(_parse([*base, *argv]))


# --out: eval replaces only the files a previous eval listed in OUT/ds_sft_eval.json. Every refusal test
# snapshots every byte under its root (tests/data/test_output_dir.py's snapshot) and checks exit 2, one
# line on stderr, and the same bytes after.

OUT_NAMES = ["eval.json", "eval.md", CHART_NAME, cli.MANIFEST, "manifest.json", "README.md", "old/eval.md"]


def _eval(argv: list[str]) -> int:
    from ds_sft.command import main_for

    return main_for("eval", [*argv, "--no_gsm8k", "--no_generate", "--val_rows", "2", "--dtype", "float32"])


# a progress bar's frames on stderr ("val:  50%|#####     | 1/2 [...]"), each after a carriage return
PROGRESS_BAR = re.compile(r"(^|\r)[\w ]+: +\d+%\|")


def _refused(capsys, code: int) -> str:
    said = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in said if not PROGRESS_BAR.search(line))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, said
    return err


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(files=st.dictionaries(st.sampled_from(OUT_NAMES), st.binary(max_size=64), min_size=1))
def test_a_folder_of_the_users_is_refused_and_left_as_it_was(data_dir, model_dir, capsys, files):
    """F8: a folder holding the user's eval.md and eval.json (or anything else) is not eval's to replace."""
    root = Path(tempfile.mkdtemp())
    try:
        out = root / "userdir4"
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        before = snapshot(root)
        err = _refused(
            capsys, _eval(["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)])
        )
        assert "cannot prove it wrote" in err or "not as ds-sft wrote them" in err
        assert snapshot(root) == before
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def previous_eval(data_dir, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("previous") / "eval"
    assert _eval(["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]) == 0
    return out


def _add_file(out):
    (out / "notes.md").write_text("mine\n")


def _edit_report(out):
    (out / "eval.md").write_text("# my edits\n")


def _add_symlink(out):
    (out / "eval.txt").symlink_to(out.parent / "victim.txt")


def _forge_listing(out):
    manifest = json.loads((out / cli.MANIFEST).read_text())
    manifest["files"]["../victim.txt"] = {"bytes": 0, "sha256": "0" * 64}
    (out / cli.MANIFEST).write_text(json.dumps(manifest))


def _drop_manifest(out):
    (out / cli.MANIFEST).unlink()


def _garble_manifest(out):
    (out / cli.MANIFEST).write_text("[1, 2]")


def _export_manifest_instead(out):  # another command's manifest is not eval's
    (out / cli.MANIFEST).rename(out / "ds_sft_export.json")


@pytest.mark.parametrize(
    "mutate",
    [
        _add_file,
        _edit_report,
        _add_symlink,
        _forge_listing,
        _drop_manifest,
        _garble_manifest,
        _export_manifest_instead,
    ],
)
def test_a_previous_eval_with_anything_not_as_eval_wrote_it_is_refused(
    data_dir, model_dir, previous_eval, tmp_path, capsys, mutate
):
    (tmp_path / "victim.txt").write_text("the user's only copy\n")
    out = tmp_path / "eval"
    shutil.copytree(previous_eval, out, symlinks=True)
    mutate(out)
    before = snapshot(tmp_path)
    _refused(capsys, _eval(["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("where", "models"),
    [
        ("data", "model"),  # the data dir itself
        ("data/eval", "model"),
        ("data/train/eval", "model"),
        (".", "model"),  # the folder holding the data dir and the models
        ("model", "model"),  # a ds-sft model folder
        ("model/eval", "model"),
        ("run", "run"),  # a training run
        ("run/eval", "run"),
        ("run/final", "run"),
        ("run/eval", "compare"),  # the second model of --compare
    ],
)
def test_an_out_that_is_holds_or_lies_inside_a_model_or_the_data_dir_is_refused(
    data_dir, model_dir, tmp_path, capsys, where, models
):
    root = tmp_path / "root"
    shutil.copytree(data_dir[0], root / "data")
    shutil.copytree(model_dir, root / "model")
    shutil.copytree(model_dir, root / "run" / "final")
    which = {
        "model": ["--model", str(root / "model")],
        "run": ["--model", str(root / "run")],
        "compare": ["--compare", str(root / "model"), str(root / "run")],
    }[models]
    before = snapshot(tmp_path)
    err = _refused(capsys, _eval([*which, "--data_dir", str(root / "data"), "--out", str(root / where)]))
    assert "outside what it is made from" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("run_file", RUN_SIGNS)
@pytest.mark.parametrize("where", ["run", "run/eval"])
def test_a_runs_final_stands_for_the_whole_run(data_dir, model_dir, tmp_path, capsys, run_file, where):
    """``--model RUN/final --out RUN/eval`` would put the report among the run's own files."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    (run / run_file).mkdir() if run_file == "checkpoints" else (run / run_file).write_text("{}\n")
    before = snapshot(tmp_path)
    argv = ["--model", str(run / "final"), "--data_dir", str(data_dir[0]), "--out", str(tmp_path / where)]
    assert "the run of the model" in _refused(capsys, _eval(argv))
    assert snapshot(tmp_path) == before


def _manifest_matches(out) -> dict:
    from ds_sft.safe_read import sha256_file

    manifest = json.loads((out / cli.MANIFEST).read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], cli.MANIFEST]) == on_disk
    for name, record in manifest["files"].items():
        assert record == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    return manifest


@pytest.mark.parametrize("state", ["missing", "empty", "previous eval"])
def test_eval_writes_a_new_or_empty_folder_and_replaces_a_previous_eval(
    data_dir, model_dir, previous_eval, tmp_path, state
):
    out = tmp_path / "eval"
    if state == "empty":
        out.mkdir()
    elif state == "previous eval":
        shutil.copytree(previous_eval, out)
    (tmp_path / "beside.txt").write_text("not eval's\n")

    overwrite = ["--overwrite"] if state == "previous eval" else []  # an eval of one model, this of two
    argv = ["--compare", str(model_dir), str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]
    assert _eval([*argv, *overwrite]) == 0

    manifest = _manifest_matches(out)
    assert set(manifest["files"]) == {"eval.json", "eval.md", CHART_NAME}
    assert len(json.loads((out / "eval.json").read_text())["models"]) == 2  # the new report, not the old
    assert (tmp_path / "beside.txt").read_text() == "not eval's\n"
    assert sorted(os.listdir(tmp_path)) == ["beside.txt", "eval"]  # no staging folder left


@pytest.mark.parametrize("other", ["models", "data"])
def test_a_previous_eval_of_other_models_or_data_is_replaced_only_with_overwrite(
    data_dir, model_dir, previous_eval, tmp_path, capsys, other
):
    """The default --out (runs/eval) of an eval of model B replaced the eval of model A without a word.
    An eval of the same model and data replaces its own; another's needs --overwrite."""
    out = tmp_path / "eval"
    shutil.copytree(previous_eval, out)
    models = (
        ["--compare", str(model_dir), str(model_dir)] if other == "models" else ["--model", str(model_dir)]
    )
    data = str(shutil.copytree(data_dir[0], tmp_path / "copy" / "data") if other == "data" else data_dir[0])
    before = snapshot(out)
    err = _refused(capsys, _eval([*models, "--data_dir", data, "--out", str(out)]))
    assert err.startswith(
        f"ds-sft eval: error: --out {out} holds the eval of {os.path.realpath(model_dir)} on "
    )
    assert err.endswith("or --overwrite to replace it") and snapshot(out) == before
    assert _eval([*models, "--data_dir", data, "--out", str(out), "--overwrite"]) == 0
    assert _manifest_matches(out)["data_dir"] == os.path.realpath(data)


def test_an_eval_of_the_same_model_and_data_replaces_its_own(data_dir, model_dir, previous_eval, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(previous_eval, out)
    assert _eval(["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]) == 0
    assert _manifest_matches(out)["models"] == [os.path.realpath(model_dir)]


def test_a_failed_eval_leaves_the_previous_one_as_it_was(
    data_dir, model_dir, previous_eval, tmp_path, monkeypatch, capsys
):
    from ds_sft.eval import report

    out = tmp_path / "eval"
    shutil.copytree(previous_eval, out)
    before = snapshot(tmp_path)
    real = report.write_report

    def write_then_fail(out_dir, results, meta):
        real(out_dir, results, meta)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", write_then_fail)
    _refused(capsys, _eval(["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]))
    assert snapshot(tmp_path) == before  # the old report, and no staging folder beside it


def test_a_harness_task_template_cannot_run_code(data_dir, model_dir, tmp_path):
    """The harness renders a task config's templates with a plain Jinja environment: this
    doc_to_text ran `id` through os.system and eval exited 0. Now it renders in the sandbox and the
    run is refused in one line."""
    pytest.importorskip(
        "lm_eval", reason="the harness is the optional extra ds-sft[eval] (pip install lm-eval)"
    )
    import yaml

    from ds_sft.eval import harness

    data_path, test = data_dir
    marker = tmp_path / "PWNED"
    config = harness.gsm8k_task_config(str(test), 6)
    config["task"] = "evil"
    config["doc_to_text"] = (
        "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }}Q: {{question}}"
    )
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(config))
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--gsm8k_test", str(test), "--no_val",
            "--no_generate", "--no_gsm8k", "--harness", str(tmp_path / "evil.yaml"), "--max_new_tokens", "4",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(
        UserError, match=r"^--harness: a task config's template reaches outside its data"
    ) as err:
        cli.run(_parse(argv))
    assert "\n" not in str(err.value) and not marker.exists()


def test_a_harness_task_regex_that_backtracks_for_hours_is_one_line(
    data_dir, model_dir, tmp_path, monkeypatch
):
    """``a*a*a*a*a*a*a*a*a*b`` passes the shape check (no repeat inside a repeat) and takes hours on a
    reference of 300 a's: the harness matched it with ``re`` until stopped by hand. Each match runs on
    a clock now, and the run is refused in one line naming the pattern."""
    pytest.importorskip(
        "lm_eval", reason="the harness is the optional extra ds-sft[eval] (pip install lm-eval)"
    )
    import yaml

    from ds_sft.eval import bounded_re, harness

    monkeypatch.setattr(bounded_re, "REGEX_SECONDS", 1.0)
    data_path, test = data_dir
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "1 + 1?", "answer": "a" * 300}) + "\n")
    config = harness.gsm8k_task_config(str(rows), 4)
    config["task"] = "slow"
    endless = "a*" * 9 + "b"
    assert harness.regex_problem(endless) is None  # the shape check lets it through
    config["metric_list"][0]["regexes_to_ignore"] = [endless]
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(config))
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--no_val", "--no_generate",
            "--no_gsm8k", "--harness", str(tmp_path / "slow.yaml"), "--max_new_tokens", "4",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(
        UserError,
        match=rf"^--harness slow: the regex {re.escape(repr(endless))} ran over 1 s on a text of 300",
    ) as err:
        cli.run(_parse(argv))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("limit", ["max_seq_len", "memory"])
def test_a_generation_that_cannot_run_is_refused_before_anything_is_measured(
    data_dir, model_dir, tmp_path, monkeypatch, limit
):
    """--max_new_tokens past max_seq_len was refused at the batch of the longest prompt, after the
    val pass and every shorter answer (2.5 minutes lost); a KV cache larger than the memory was an
    allocator traceback."""
    import ds_sft.machine
    from ds_sft.eval import evaluate

    monkeypatch.setattr(evaluate, "validation_metrics", lambda *args: pytest.fail("the val pass ran"))
    monkeypatch.setattr(
        evaluate, "generate", lambda *args, **kwargs: pytest.fail("generation ran"), raising=False
    )
    if limit == "memory":
        monkeypatch.setattr(ds_sft.machine, "free_memory", lambda device: (1 << 10, "available in this test"))
    data_path, test = data_dir
    new_tokens = "500" if limit == "max_seq_len" else "6"
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--gsm8k_test", str(test),
            "--max_new_tokens", new_tokens, "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    argv += ["--no_val"] if limit == "memory" else []  # the val pass's own bound would answer first
    expected = (
        r"^the longest prompt to answer \(\d+ tokens\) \+ --max_new_tokens 500 exceeds the model's"
        if limit == "max_seq_len"
        else r"^a batch of \d+ answers keeps [\d.]+ GiB of keys and values .* available in this test: lower"
    )
    with pytest.raises(UserError, match=expected):
        cli.run(_parse(argv))
    assert not (tmp_path / "out").exists()


def test_a_prompt_that_fills_the_models_positions_names_the_flags_that_skip_it(data_dir, tmp_path):
    """It said "shorten that problem" of GSM8K's test set or of the built-in prompts, which the user
    cannot edit; the flags that skip those answers are what to pass."""
    torch.manual_seed(0)
    short = save_model(
        LlamaModel(ModelConfig.preset("tiny", vocab_size=50304, max_seq_len=32)), tmp_path / "m"
    )
    data_path, test = data_dir
    argv = ["--model", str(short), "--data_dir", str(data_path), "--gsm8k_test", str(test), "--no_val",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(
        UserError, match=r"^a prompt to answer has \d+ tokens, as many as the model's max_seq_len 32"
    ) as err:
        cli.run(_parse(argv))
    assert "pass --no_gsm8k and --no_generate" in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (
            "Paris is the capital of France. " * 70_000,
            r"^a problem to answer has at least [\d,]+ tokens \(from the",
        ),
        ("a " * 600, r"^a prompt to answer has [\d,]+ tokens, as many as the model's max_seq_len 512"),
    ],
)
def test_a_problem_too_long_for_the_model_is_refused_naming_it(
    data_dir, model_dir, tmp_path, monkeypatch, question, expected
):
    """A 200 MB question was tokenized whole (228 s, 14 GB) and then refused with "lower
    --max_new_tokens", which cannot help: a text certainly too long is refused from its length, and a
    prompt that fills max_seq_len by itself says so."""
    from ds_sft.eval import evaluate

    encoded = []
    prompt_ids = evaluate.EvalData.prompt_ids
    monkeypatch.setattr(
        evaluate.EvalData, "prompt_ids", lambda self, r: encoded.append(r) or prompt_ids(self, r)
    )
    test = _write_jsonl(tmp_path / "test.jsonl", [{"question": question, "answer": "so #### 3"}])
    argv = ["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--gsm8k_test", str(test),
            "--no_val", "--no_generate", "--max_new_tokens", "2", "--dtype", "float32",
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match=expected):
        cli.run(_parse(argv))
    assert not (tmp_path / "out").exists()
    assert all(len(record["instruction"]) < 10_000 for record in encoded)


def test_a_val_batch_larger_than_the_memory_is_refused_naming_one_that_fits(
    data_dir, model_dir, tmp_path, monkeypatch
):
    """--batch_size had no bound (generation's was checked): 4,096 rows of 1,024 tokens went to the
    forward and ended in the OOM killer or an allocator traceback, after the model had loaded."""
    import ds_sft.machine
    from ds_sft.data.shards import PackedDataset
    from ds_sft.eval import evaluate

    data_path, _ = data_dir
    config = ModelConfig.load(model_dir / "model_config.json")
    seq_len = PackedDataset(data_path, "val").seq_len
    per_row, fixed = evaluate.val_forward_bytes(config, seq_len, 4, torch.device("cpu"))
    free = fixed + 2 * per_row + per_row // 2  # two rows fit, three do not
    monkeypatch.setattr(ds_sft.machine, "free_memory", lambda device: (free, "available in this test"))
    real_metrics = evaluate.validation_metrics
    monkeypatch.setattr(evaluate, "validation_metrics", lambda *args: pytest.fail("the val pass ran"))
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--no_gsm8k", "--no_generate",
            "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError) as refusal:
        cli.run(_parse([*argv, "--batch_size", "3"]))
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(
        f"a val forward of 3 rows of {seq_len} tokens needs about"
    )
    assert message.endswith("available in this test: pass --batch_size 2 or less")
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(evaluate, "validation_metrics", real_metrics)
    assert cli.run(_parse([*argv, "--batch_size", "2", "--val_rows", "4"])) == 0


@pytest.mark.parametrize(
    "model_b, refusal",
    [
        ({"max_seq_len": 64}, r"holds rows of 128 tokens but .* has 64 positions"),
        ({"vocab_size": 256, "max_seq_len": 512}, r"vocabulary but the model has 256 embeddings"),
        ({"max_seq_len": 128}, r"^the longest prompt to answer .* --max_new_tokens 100 exceeds"),
    ],
    ids=["positions", "vocabulary", "answer_length"],
)
def test_compare_refuses_model_b_before_model_a_is_measured(
    data_dir, model_dir, tmp_path, monkeypatch, model_b, refusal
):
    """Model B's refusals came only after model A's whole eval (val, GSM8K, generations): an hour
    of work at the default 1,319 problems, then one line about B."""
    from ds_sft.eval import evaluate

    monkeypatch.setattr(evaluate, "validation_metrics", lambda *args: pytest.fail("model A was measured"))
    torch.manual_seed(0)
    b = save_model(LlamaModel(ModelConfig.preset("tiny", **{"vocab_size": 50304, **model_b})), tmp_path / "b")
    data_path, test = data_dir
    argv = ["--compare", str(model_dir), str(b), "--data_dir", str(data_path), "--gsm8k_test", str(test),
            "--max_new_tokens", "100", "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match=refusal):
        cli.run(_parse(argv))
    assert not (tmp_path / "out").exists()


def test_each_prompt_is_rendered_and_tokenized_once_per_eval(data_dir, model_dir, tmp_path, monkeypatch):
    """The generation check, then each model's answers, read the same prompts: they were rendered
    and tokenized again by every reader (three times per prompt when comparing two models)."""
    from ds_sft.data import templates
    from ds_sft.eval.prompts import FIXED_PROMPTS

    rendered = []
    render = templates.render_prompt
    monkeypatch.setattr(
        templates, "render_prompt", lambda record, *a: rendered.append(record) or render(record, *a)
    )
    data_path, test = data_dir
    argv = ["--compare", str(model_dir), str(model_dir), "--data_dir", str(data_path),
            "--gsm8k_test", str(test), "--gsm8k_limit", "3", "--max_new_tokens", "2", "--no_val",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.run(_parse(argv)) == 0
    distinct = {json.dumps(record, sort_keys=True) for record in rendered}
    assert len(rendered) == len(distinct) == 3 + len(FIXED_PROMPTS)


@pytest.mark.parametrize("manifest_records_it", [True, False])
def test_a_data_dir_without_its_tokenizer_is_refused_before_any_model_loads(
    data_dir, model_dir, tmp_path, monkeypatch, manifest_records_it
):
    """A copy of the shards without tokenizer/ was evaluated with GPT-2's tokenizer, whatever the
    manifest recorded: GSM8K and the generations were silently wrong (or an embedding IndexError)."""
    import shutil

    import ds_sft.model.checkpoint
    from ds_sft.data.model_match import data_tokenizer_identity

    data_path, test = data_dir
    copy = tmp_path / "data"
    shutil.copytree(data_path, copy)
    shutil.rmtree(copy / "tokenizer")
    manifest = json.loads((copy / "manifest.json").read_text())
    if not manifest_records_it:
        del manifest["tokenizer"]["identity"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
    else:
        assert manifest["tokenizer"]["identity"]
        with pytest.raises(UserError, match="has no tokenizer/ folder, though it was prepared with one"):
            data_tokenizer_identity(str(copy))  # what train's checks ask too
    monkeypatch.setattr(ds_sft.model.checkpoint, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    argv = ["--model", str(model_dir), "--data_dir", str(copy), "--gsm8k_test", str(test),
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserError, match=r"has no tokenizer/ folder") as err:
        cli.run(_parse(argv))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("measure", ["val", "gsm8k"])
def test_a_model_whose_logits_are_not_finite_is_refused_not_reported(data_dir, tmp_path, capsys, measure):
    """Finite weights whose attention scores pass float32 (NaN weights are refused at load) were
    reported as val loss nan, ppl nan (exit 0, a bare NaN in eval.json that strict JSON readers
    refuse), and their argmax-of-NaN answers were scored as GSM8K completions."""
    from ds_sft.command import main_for

    data_path, test = data_dir
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig.preset("tiny", vocab_size=50304, max_seq_len=512))
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.mul_(1e20)
        model.layers[0].attn.k_proj.weight.mul_(1e20)
    path = save_model(model, tmp_path / "broken")
    only = (
        ["--no_gsm8k", "--val_rows", "2"]
        if measure == "val"
        else ["--no_val", "--gsm8k_test", str(test), "--gsm8k_limit", "2", "--max_new_tokens", "2"]
    )
    code = main_for("eval", ["--model", str(path), "--data_dir", str(data_path), "--no_generate", *only,
                             "--dtype", "float32", "--out", str(tmp_path / "eval")])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert code == 2 and last.startswith("ds-sft eval: error: the model's logits are not finite"), last
    assert "overflow in float32" in last and not (tmp_path / "eval").exists()


def test_the_report_records_the_rows_and_problems_measured_not_the_ones_asked_for(
    data_dir, model_dir, tmp_path
):
    """--val_rows and --gsm8k_limit past the split's rows and the test file's problems measured all
    of them, and the report said 1000000 val rows and a 5000-problem subset."""
    data_path, test = data_dir
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data_dir", str(data_path), "--gsm8k_test", str(test),
            "--val_rows", "1000000", "--gsm8k_limit", "5000", "--max_new_tokens", "1", "--no_generate",
            "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert cli.run(_parse(argv)) == 0
    report = json.loads((out / "eval.json").read_text())
    (result,) = report["models"]
    assert report["val_rows"] == result["val"]["rows"] < 1000000
    assert report["gsm8k_limit"] is None and result["gsm8k"]["total"] == 6
    md = (out / "eval.md").read_text()
    assert f"- val_rows: `{result['val']['rows']}`" in md and "5000" not in md


def test_an_eval_of_a_hub_model_is_an_eval_of_the_snapshot_it_read(tmp_path, monkeypatch):
    """--out's record names what was read: ``org/model``, ``org/model@main`` and its commit are one
    model (the second was refused as another's eval without --overwrite), and ``org/model`` once main
    moved to a new commit is another (its eval was replaced without a word)."""
    from huggingface_hub import constants

    from tests.hub_cache import publish

    cache, first, second = tmp_path / "hub", "a" * 40, "b" * 40
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for commit in (first, second):
        folder = tmp_path / commit[0]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"commit": commit}))
        (folder / "model.safetensors").write_bytes(commit.encode())
    publish(cache, "org/model", tmp_path / "a", first)
    args = argparse.Namespace(data_dir=str(tmp_path))

    def record(spec: str) -> list[str]:
        return cli.evaluated(args, [cli.resolve_model_path(spec)])["models"]

    spellings = ["org/model", "org/model@main", f"org/model@{first}"]
    records = [record(spec) for spec in spellings]
    assert records[0] == records[1] == records[2], records

    publish(cache, "org/model", tmp_path / "b", second)  # main moves on
    assert record("org/model") != records[0]
    assert record(f"org/model@{first}") == records[0]


@pytest.fixture(scope="module")
def model_specs(tmp_path_factory, model_dir, gpt2_tokenizer_dir) -> dict:
    """The tiny model in every form ``--model`` takes, each a spec with what it resolves to (a hub
    id is served from a hub cache made here, offline; the alias from a package made here):
    {kind: (spec, the cache it needs or None)}."""
    from huggingface_hub import constants

    from ds_sft.data.tokenizer import load_tokenizer
    from ds_sft.model.checkpoint import load_model
    from ds_sft.model.export import export_hf
    from tests.gguf_files import write_model_gguf
    from tests.hub_cache import publish

    root = tmp_path_factory.mktemp("specs")
    model = load_model(str(model_dir))
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    run = root / "run"
    save_model(model, run / "final")
    (run / "final" / "trained_on.json").write_text(json.dumps({"template": "alpaca", "step": 3}))
    torch.save({"model": state, "model_args": model.config.to_dict()}, root / "nanogpt.pt")
    write_model_gguf(root / "tiny.gguf", model.config, state)
    hf = export_hf(model, load_tokenizer(str(gpt2_tokenizer_dir)), root / "hf")
    cache = root / "hub"
    publish(cache, "org/tiny", hf, "c" * 40)
    package = root / "packages" / "tiny_alias_weights"
    shutil.copytree(model_dir, package)
    (package / "__init__.py").write_text("")
    assert constants.HF_HUB_CACHE  # the cache the fake hub replaces
    return {
        "run dir": str(run),
        "run final": str(run / "final"),
        "run weights file": str(run / "final" / "model.safetensors"),
        "ds-sft folder": str(model_dir),
        "safetensors file": str(model_dir / "model.safetensors"),
        "torch file": str(root / "nanogpt.pt"),
        "gguf file": str(root / "tiny.gguf"),
        "hf folder": str(hf),
        "hub id": "org/tiny",
        "hub id at a revision": f"org/tiny@{'c' * 40}",
        "alias": "tiny-alias",
        "_hub cache": cache,
        "_packages": root / "packages",
    }


MODEL_KINDS = ["run dir", "run final", "run weights file", "ds-sft folder", "safetensors file", "torch file",
               "gguf file", "hf folder", "hub id", "hub id at a revision", "alias"]  # fmt: skip


@pytest.mark.parametrize(
    "kinds", [[kind] for kind in MODEL_KINDS] + [["hub id", "run dir"]], ids=[*MODEL_KINDS, "compare"]
)
def test_each_model_spec_is_resolved_once(data_dir, model_specs, tmp_path, monkeypatch, kinds):
    """The --out check, the tokenizer and template checks and the load (twice for --compare's model B)
    each resolved the model spec again: a folder or a file up to four times, and online a hub id
    asked the hub each time. One resolve serves them all; its path is passed along."""
    import sys

    from huggingface_hub import constants

    import ds_sft.model_source
    from ds_sft.data import model_match

    pytest.importorskip("gguf", reason="the GGUF form needs the gguf package (pip install 'ds-sft[gguf]')")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(model_specs["_hub cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(model_specs["_packages"]))
    aliases = {
        **ds_sft.model_source.MODEL_ALIASES,
        "tiny-alias": ("tiny_alias_weights", "model.safetensors", "-"),
    }
    monkeypatch.setattr(ds_sft.model_source, "MODEL_ALIASES", aliases)
    identity = model_match.model_tokenizer_identity
    data_identity = model_match.data_tokenizer_identity(str(data_dir[0]))
    monkeypatch.setattr(  # the test's GGUF carries no tokenizer: take it for the data's (read, not resolved)
        model_match,
        "model_tokenizer_identity",
        lambda where: data_identity if where.suffix == ".gguf" else identity(where),
    )

    resolved, asked_hub = [], []
    resolve, snapshot = ds_sft.model_source.resolve_model_path, ds_sft.model_source.hub_snapshot

    def counted(spec, what="model", forms="an existing path"):
        resolved.append((str(spec), what))
        return resolve(spec, what, forms)

    for module in [
        m for m in list(sys.modules.values()) if getattr(m, "resolve_model_path", None) is resolve
    ]:
        monkeypatch.setattr(module, "resolve_model_path", counted)
    monkeypatch.setattr(
        ds_sft.model_source, "hub_snapshot", lambda *a, **k: asked_hub.append(a) or snapshot(*a, **k)
    )
    specs = [model_specs[kind] for kind in kinds]
    which = ["--model", *specs] if len(specs) == 1 else ["--compare", *specs]
    assert _eval([*which, "--data_dir", str(data_dir[0]), "--out", str(tmp_path / "out")]) == 0
    # each spec once as a model; the paths they resolved to are read as they are (a tokenizer folder
    # is loaded by its path: resolved as a tokenizer, never through the hub)
    assert sorted(spec for spec, what in resolved if what == "model") == sorted(specs)
    assert len(asked_hub) == sum(kind.startswith("hub id") for kind in kinds)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_takes_bf16_only_where_the_device_computes_in_it(
    data_dir, model_dir, tmp_path, monkeypatch, native
):
    """``--dtype`` left out is auto: bfloat16 where ``machine.hardware_bf16`` says the device computes in
    it, else float32 (emulated bf16 ran the demo's eval ~100x slower than fp32); eval.json records which."""
    from ds_sft.command import main_for

    asked = []
    monkeypatch.setattr(cli, "hardware_bf16", lambda device: asked.append(device) or (native, "said so"))
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data_dir", str(data_dir[0]), "--out", str(out)]
    assert main_for("eval", [*argv, "--no_gsm8k", "--no_generate", "--val_rows", "2"]) == 0
    assert [str(device) for device in asked] == ["cpu"]
    assert json.loads((out / "eval.json").read_text())["dtype"] == ("bfloat16" if native else "float32")
