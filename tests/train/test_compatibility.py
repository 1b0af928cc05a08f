"""``ds-sft train`` refuses parts that don't belong together, in one line, before the engine is built.

Fresh runs: data tokenized with another tokenizer of the same size than the base model's own, and rows
longer than the model's positions. Resumes: every key of the run's identity table, changed alone,
is named with its saved and new value (exit 2, no traceback, the checkpoint untouched) unless
``--allow_change KEY`` lets it through, printed and recorded in trainer_state.json, metrics.jsonl and
report.md; nothing changed resumes; a new world size or micro-batch at the same global batch is not a
difference that needs a flag.
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from ds_sft.cli import main
from ds_sft.data.model_match import refuse_rows_past_positions
from ds_sft.errors import UserError
from ds_sft.model.config import PRESETS, ModelConfig
from ds_sft.train import compatibility
from ds_sft.train.preflight import check_data_fits_model
from tests.data.match_helpers import prepare, tiny_model_dir, two_tokenizers
from tests.train.helpers import TinyPacked, settings, tiny_model, write_data_dir

FLAGS = [
    "--micro_batch_size", "2", "--grad_accum", "2", "--zero_stage", "2", "--precision", "fp32",
    "--seed", "1", "--learning_rate", "1e-3", "--warmup_iters", "1", "--eval_interval", "100",
    "--eval_iters", "1", "--save_interval", "1", "--wandb_mode", "disabled", "--kernels", "torch",
]  # fmt: skip


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("match")
    a, b = two_tokenizers(root / "tokenizers")
    return SimpleNamespace(
        root=root,
        data_a=prepare(root / "data_a", a),
        data_a_other_rows=prepare(root / "data_a_other_rows", a, offset=100),
        data_a_128=prepare(root / "data_a_128", a, seq_len=128),
        data_b=prepare(root / "data_b", b),
        model_a=tiny_model_dir(root / "model_a", a),
        model_b={
            layout: tiny_model_dir(root / f"model_b_{layout}", b, layout)
            for layout in ("folder", "root", "run")
        },
        bare=tiny_model_dir(root / "bare"),
        bare_one_layer=tiny_model_dir(root / "bare_one_layer", n_layers=1),
        bare_theta=tiny_model_dir(root / "bare_theta", rope_theta=5e5),  # the same weights' shapes
        short=tiny_model_dir(root / "short", a, max_seq_len=32),
        bare_other_weights=other_weights(root / "bare", root / "bare_other_weights"),
        fp32_reductions=recipe_file(root / "fp32_reductions.json", communication_data_type="fp32"),
    )


def recipe_file(path, **entries):
    """The shipped recipe JSON with ``entries`` set at its top level."""
    from importlib.resources import files

    config = json.loads((files("ds_configs") / "sft_recipe.json").read_text())
    path.write_text(json.dumps({**config, **entries}))
    return path


def other_weights(model_dir, out):
    """A copy of ``model_dir`` with other weights of the same shapes (a fine-tune of it, say)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    save_file({name: tensor * 1.5 for name, tensor in weights.items()}, str(out / "model.safetensors"))
    return out


def train(data, base, out, *extra: str, max_iters: int = 2) -> int:
    flags = ["--data_dir", str(data), "--base_model", str(base), "--out_dir", str(out)]
    return main(["train", *flags, *FLAGS, "--max_iters", str(max_iters), *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ds-sft train: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("layout", ["folder", "root", "run"])
def test_data_from_another_tokenizer_of_the_same_size_is_refused(
    parts, layout, tmp_path, capsys, dist_env, monkeypatch
):
    """Refused before the base model's weights load (the refusal came after a 135M model's load, 23 s)."""
    import ds_sft.train.cli

    monkeypatch.setattr(ds_sft.train.cli, "build_model", lambda *a, **k: pytest.fail("the weights loaded"))
    model_b = parts.model_b[layout]
    assert train(parts.data_a, model_b, tmp_path / "run") == 2
    line = one_line_error(capsys)
    assert f"{parts.data_a} was tokenized with" in line and f"but {model_b} uses another tokenizer" in line
    assert "420 tokens" in line and "ds-sft prepare --base_model" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_from_the_model_tokenizer_trains(parts, tmp_path, capsys, dist_env):
    assert train(parts.data_a, parts.model_a, tmp_path / "run", max_iters=1) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_rows_longer_than_the_model_positions_are_refused(parts, tmp_path, capsys, dist_env):
    assert train(parts.data_a, parts.short, tmp_path / "run") == 2
    line = one_line_error(capsys)
    assert "rows of 256 tokens" in line and "32 positions" in line and "--seq_len 32" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ids_past_a_torch_files_embeddings_are_refused_once_it_is_built(
    tmp_path, capsys, dist_env, monkeypatch
):
    """A torch file's shapes lie inside its pickle: the data is checked against the model it builds, by
    the check the other layouts get before their weights load (tests/train/test_preflight.py)."""
    import ds_sft.train.loop
    from tests.data.test_model_positions import torch_file

    monkeypatch.setattr(ds_sft.train.loop, "train", lambda *a, **k: pytest.fail("the engine was built"))
    data = write_data_dir(tmp_path / "data", train_rows=8)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {"vocab_size": 513}}))
    spec = torch_file(tmp_path / "base.pt", 256)  # 512 embeddings
    assert train(data, spec, tmp_path / "run") == 2
    line = one_line_error(capsys)
    assert f"513-token vocabulary but the model has 512 embeddings ({spec}" in line, line


@pytest.mark.parametrize("past", [0, 1, 1000])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rows_past_a_preset_positions_are_refused_by_the_one_check(preset, past, tmp_path):
    """``train --model PRESET``: rows up to the preset's positions pass, one more or many more are refused
    in one line (before the preset is built: preflight), by the refusal ``prepare --base_model`` gives
    (model_match.refuse_rows_past_positions)."""
    config = ModelConfig.preset(preset)
    s = SimpleNamespace(base_model=None, model=preset, data_dir=write_data_dir(tmp_path / "data"))
    seq_len = config.max_seq_len + past
    if not past:
        check_data_fits_model(s, seq_len)
        return
    with pytest.raises(UserError) as refused:
        check_data_fits_model(s, seq_len)
    said, positions = str(refused.value), config.max_seq_len
    assert f"holds rows of {seq_len:,} tokens but the {preset} preset has {positions:,} positions" in said
    assert f"--seq_len {positions} or less" in said and "\n" not in said
    with pytest.raises(UserError) as prepare_says:
        refuse_rows_past_positions(f"{s.data_dir} holds rows", seq_len, f"the {preset} preset", positions)
    assert said == str(prepare_says.value)


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def saved_run(parts, dist_env):
    """Two steps of the bare base model on data_a, a checkpoint after each."""
    run = parts.root / "saved_run"
    assert train(parts.data_a, parts.bare, run) == 0
    return run


def changes(parts) -> dict[str, tuple[list[str], dict]]:
    """key of the identity table -> (flags that change it alone, replacements for data / base model)."""
    return {
        "seed": (["--seed", "7"], {}),
        "zero_stage to 0": (["--zero_stage", "0"], {}),
        "zero_stage to 3": (["--zero_stage", "3"], {}),
        "precision": (["--precision", "bf16"], {}),
        "fp8": (["--fp8", "torch"], {}),  # runs on CPU (dequantized)
        "micro_batch_size": (["--micro_batch_size", "4", "--grad_accum", "1"], {}),  # same global batch
        "global_batch": (["--grad_accum", "4"], {}),
        "schedule": (["--learning_rate", "2e-3"], {}),
        "data": ([], {"data": parts.data_a_other_rows}),
        "seq_len": ([], {"data": parts.data_a_128}),
        "tokenizer": ([], {"data": parts.data_b}),
        "model": ([], {"base": parts.bare_one_layer}),
        "base_weights": ([], {"base": parts.bare_other_weights}),
        "communication_data_type": (["--deepspeed_config", str(parts.fp32_reductions)], {}),
    }


CELLS = ["seed", "zero_stage to 0", "zero_stage to 3", "precision", "fp8"]
CELLS += ["global_batch", "schedule", "data", "seq_len", "tokenizer", "model", "base_weights"]
CELLS += ["communication_data_type"]
CELLS = [cell for cell in CELLS if cell.split(" to ")[0] not in compatibility.RESUMABLE]


def test_the_matrix_changes_every_key_of_the_table(saved_run):
    state = json.loads((saved_run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    # fp8_layout: what --fp8 auto resolves to on another machine (test_fp8_that_resolves_otherwise_...)
    keys = {cell.split(" to ")[0] for cell in CELLS} | compatibility.RESUMABLE | {"fp8_layout"}
    assert keys == set(state["run"]) == set(compatibility.HOW_TO_RESUME) == set(compatibility.IDENTITY_KEYS)


@pytest.mark.parametrize("key", compatibility.IDENTITY_KEYS)
def test_every_key_says_how_to_put_it_back_whatever_was_recorded(saved_run, key):
    """The fix is one line of text for the saved value as recorded, and for a table one side lacks
    (a checkpoint from before fp8 or the schedule was recorded: None)."""
    state = json.loads((saved_run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    recorded = state["run"][key]
    for saved, now in ((recorded, recorded), (None, recorded), (recorded, None)):
        fix = compatibility.HOW_TO_RESUME[key](saved, now)
        assert isinstance(fix, str) and fix and "\n" not in fix


@pytest.mark.parametrize("cell", CELLS)
def test_resume_refuses_each_difference_in_one_line(parts, saved_run, cell, tmp_path, capsys, dist_env):
    key = cell.split(" to ")[0]
    flags, swap = changes(parts)[cell]
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    data, base = swap.get("data", parts.data_a), swap.get("base", parts.bare)
    assert train(data, base, run, "--resume", *flags, max_iters=3) == 2
    line = one_line_error(capsys)
    assert line.startswith("ds-sft train: error: --resume ")
    assert re.search(rf"[:;] {key} .*? -> ", line), line  # the key, saved value -> value now
    assert "to resume, " in line and "another --out_dir" in line
    assert re.search(rf"or continue with the change by --allow_change (\w+,)*{key}\b", line), line
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert not (run / "checkpoints" / "step_000003").exists()


def test_resume_with_nothing_changed_continues(parts, saved_run, tmp_path, capsys, dist_env):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    assert train(parts.data_a, parts.bare, run, "--resume", max_iters=3) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out
    assert "note: --max_iters 2 -> 3: the cosine now ends at step 3, so from step 2 on the lr" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"


def test_a_schedule_change_is_refused_with_the_flags_that_put_it_back(
    parts, saved_run, tmp_path, capsys, dist_env
):
    """The lr and the clipping of every later step: changed at resume, the run went on with an lr 5
    times higher and no clipping, and the only line was the override a fresh run prints too."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    assert train(parts.data_a, parts.bare, run, "--resume", "--learning_rate", "5e-3", "--grad_clip", "0",
                 max_iters=3) == 2  # fmt: skip
    line = one_line_error(capsys)
    assert "schedule grad_clip 1.0 -> 0.0, learning_rate 0.001 -> 0.005" in line
    assert "to resume, pass --learning_rate 0.001 --grad_clip 1.0;" in line
    assert not (run / "checkpoints" / "step_000003").exists()


def test_the_default_warmup_capped_by_a_short_run_is_not_capped_again_silently(
    parts, tmp_path, capsys, dist_env
):
    """--warmup_iters left at its default 10 is capped at --max_iters 2; resumed to --max_iters 3 the cap
    is 3, and the lr warmed up a second time without a word. Now the resume names the saved warmup."""
    at = FLAGS.index("--warmup_iters")
    flags = FLAGS[:at] + FLAGS[at + 2 :]
    run = tmp_path / "run"

    def train_default_warmup(max_iters, *extra):
        paths = ["--data_dir", str(parts.data_a), "--base_model", str(parts.bare), "--out_dir", str(run)]
        return main(["train", *paths, *flags, "--max_iters", str(max_iters), *extra])

    assert train_default_warmup(2) == 0
    capsys.readouterr()
    assert train_default_warmup(3, "--resume") == 2
    line = one_line_error(capsys)
    assert "schedule warmup_iters 2 -> 3" in line and "to resume, pass --warmup_iters 2;" in line
    assert train_default_warmup(3, "--resume", "--warmup_iters", "2") == 0


def test_the_val_sample_is_the_runs_across_a_resumable_micro_batch_change(
    parts, saved_run, tmp_path, capsys, dist_env
):
    """--eval_iters x --micro_batch_size rows: 1 x 2 when saved, 1 x 4 after a resumable micro-batch
    change. The evals after the resume scored other rows than the ones best_val was measured on."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    assert train(parts.data_a, parts.bare, run, "--resume", "--micro_batch_size", "4", "--grad_accum", "1",
                 "--eval_interval", "1", max_iters=3) == 0  # fmt: skip
    out = capsys.readouterr().out
    saved = json.loads((saved_run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    now = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert len(saved["val_sample"]["rows"]) == 2 and now["val_sample"] == saved["val_sample"]
    assert (
        "note: the val sample stays the run's 2 rows (--eval_iters x --micro_batch_size asks for 4 "
        "now, 2 then)" in out
    )
    assert "val sample: 2 of" in out


def test_a_new_world_size_at_the_same_global_batch_is_no_difference():
    model = tiny_model()
    saved = compatibility.run_identity(settings(grad_accum=2), model, TinyPacked(2, 0), 2, {})
    same_batch = compatibility.run_identity(settings(grad_accum=4), model, TinyPacked(2, 0), 1, {})
    half_batch = compatibility.run_identity(settings(grad_accum=2), model, TinyPacked(2, 0), 1, {})
    assert compatibility.differences(saved, same_batch) == {}
    assert compatibility.differences(saved, half_batch) == {"global_batch": (8, 4)}


def test_only_recorded_keys_are_compared_and_allowed_keys_may_change():
    now = compatibility.run_identity(settings(), tiny_model(), TinyPacked(2, 0), 1, {})
    older_checkpoint = {"step": 4, "world_size": 1, "zero_stage": 3}  # saved before the table existed
    assert compatibility.differences(compatibility.saved_identity(older_checkpoint), now, set()) == {
        "zero_stage": (3, 2)
    }
    saved = {**now, "seed": 5, "precision": "bf16"}
    assert set(compatibility.differences(saved, now)) == {"seed", "precision"} - compatibility.RESUMABLE
    assert set(compatibility.differences(saved, now, set())) == {"seed", "precision"}
    assert set(compatibility.differences(saved, now, allowed={"seed"})) == {"precision"}


def records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_a_new_micro_batch_at_the_same_global_batch_resumes_without_a_flag(
    parts, saved_run, tmp_path, capsys, dist_env
):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    assert train(parts.data_a, parts.bare, run, "--resume", "--micro_batch_size", "4", "--grad_accum", "1",
                 max_iters=3) == 0  # fmt: skip
    assert "resume changes micro_batch_size 2 -> 4 (resumable" in capsys.readouterr().out
    (change,) = records(run, "change")
    assert change | {"message": None} == {"type": "change", "step": 2, "key": "micro_batch_size", "saved": 2,
                                          "now": 4, "how": "resumable", "message": None}  # fmt: skip


# Changes an --allow_change lets through, with the other keys they change: other data of another
# seq_len or tokenizer is also other data. Each runs on.
ALLOWED = {
    "seed": {"seed"},
    "global_batch": {"global_batch"},
    "schedule": {"schedule"},
    "data": {"data"},
    "seq_len": {"seq_len", "data"},
    "tokenizer": {"tokenizer", "data"},
    "model": {"model"},
    "fp8": {"fp8", "fp8_layout"},
    "base_weights": {"base_weights"},
    "communication_data_type": {"communication_data_type"},
}


@pytest.mark.parametrize(
    "key", [pytest.param(key, marks=pytest.mark.slow) if key == "fp8" else key for key in ALLOWED]
)  # fp8 torch on CPU: a minute of dequantized matmuls
def test_allow_change_resumes_and_records_the_change(parts, saved_run, key, tmp_path, capsys, dist_env):
    flags, swap = changes(parts)[key]
    swap = {"base": parts.bare_theta} if key == "model" else swap  # n_layers would change the weights
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    data, base = swap.get("data", parts.data_a), swap.get("base", parts.bare)
    allow = ",".join(sorted(ALLOWED[key]))
    assert train(data, base, run, "--resume", "--allow_change", f"fp8,{allow}", *flags, max_iters=3) == 0
    out = capsys.readouterr().out
    saved = json.loads((saved_run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["run"]
    now = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    changed = [k for k in saved if saved[k] != now["run"][k]]
    assert set(changed) == ALLOWED[key]  # the change, and only it
    expected = [
        {"step": 2, "key": k, "saved": saved[k], "now": now["run"][k], "how": "allowed"} for k in changed
    ]
    assert now["changes"] == expected
    report = (run / "report.md").read_text()
    for change, record in zip(expected, records(run, "change"), strict=True):
        line = (
            f"{compatibility.show(change['key'], change['saved'], change['now'])} (allowed by --allow_change"
        )
        assert f"resume changes {line}" in out
        assert (
            record == {"type": "change", **change, "message": record["message"]} and line in record["message"]
        )
        assert f"- step 2: {line}" in report


def test_allow_change_of_the_global_batch_continues_the_data_stream(parts, saved_run, tmp_path, dist_env):
    """Steps of 4 rows, then (allowed) of 16: the sampler's cursor goes on from row 8, no row twice."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    assert train(parts.data_a, parts.bare, run, "--resume", "--allow_change", "global_batch",
                 "--grad_accum", "8", max_iters=4) == 0  # fmt: skip
    states = [json.loads((run / "checkpoints" / f"step_00000{s}" / "trainer_state.json").read_text())
              for s in (3, 4)]  # fmt: skip
    assert [s["sampler"]["consumed_samples"] for s in states] == [2 * 4 + 16, 2 * 4 + 32]
    assert all(s["run"]["global_batch"] == 16 for s in states)


def test_allow_change_cannot_load_weights_of_another_shape(parts, saved_run, tmp_path, capsys, dist_env):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    allow = ["--allow_change", "model,base_weights"]  # another shape: other weights too
    assert train(parts.data_a, parts.bare_one_layer, run, "--resume", *allow) == 2
    line = one_line_error(capsys)
    assert "--allow_change model: the weights of" in line and "layers.1." in line and "absent now" in line
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"


@pytest.mark.parametrize("value", ["nonsense", "seed,nonsense"])
def test_allow_change_of_an_unknown_key_lists_the_keys(value, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--allow_change", value])
    assert exit.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "argument --allow_change:" in line and "'nonsense'" in line
    assert all(key in line for key in compatibility.IDENTITY_KEYS)


@pytest.mark.parametrize("keys", [["seed"], ["zero_stage", "precision"]])
def test_allow_change_without_resume_is_refused_before_any_work(parts, keys, tmp_path, capsys, monkeypatch):
    """A fresh run has no saved settings to change: the flag means the user forgot --resume."""
    import ds_sft.train.distributed

    monkeypatch.setattr(ds_sft.train.distributed, "init_distributed", None)  # not reached
    assert train(parts.data_a, parts.bare, tmp_path / "run", "--allow_change", ",".join(keys)) == 2
    line = one_line_error(capsys)
    assert f"--allow_change {','.join(keys)}" in line and "add --resume" in line
    assert not (tmp_path / "run").exists()


def test_check_resume_lets_through_resumable_and_allowed_keys_and_names_the_rest():
    now = compatibility.run_identity(settings(), tiny_model(), TinyPacked(2, 0), 1, {})
    saved = {**now, "micro_batch_size": 1, "seed": 5, "global_batch": 2}
    state = {"zero_stage": now["zero_stage"], "run": saved}
    with pytest.raises(UserError) as refused:
        compatibility.check_resume("CKPT", state, now, allow=["seed"])
    line = str(refused.value)
    assert "global_batch 2 -> 4" in line and "--allow_change global_batch " in line and "seed 5" not in line
    changes = compatibility.check_resume("CKPT", state, now, allow=["seed", "global_batch"])
    assert changes == [
        {"key": "seed", "saved": 5, "now": now["seed"], "how": "allowed"},
        {"key": "micro_batch_size", "saved": 1, "now": 2, "how": "resumable"},
        {"key": "global_batch", "saved": 2, "now": 4, "how": "allowed"},
    ]
    assert (
        compatibility.check_resume("CKPT", {"run": now}, now, allow=list(compatibility.IDENTITY_KEYS)) == []
    )


def test_an_allowed_model_change_must_keep_every_weight_shape():
    model = tiny_model()
    config = {
        k: v for k, v in model.config.architecture().items() if k not in compatibility.NOT_COMPARED_FIELDS
    }
    compatibility.check_same_weights("CKPT", {**config, "rope_theta": 5e5}, model)  # same shapes: fine
    for change in ({"n_layers": config["n_layers"] + 1}, {"ffn_hidden": 8}, {"tie_embeddings": False}):
        with pytest.raises(UserError, match="do not fit this model"):
            compatibility.check_same_weights("CKPT", {**config, **change}, model)
    with pytest.raises(UserError, match="n_heads must be an integer from 1 to 1,024, got 'four'"):
        compatibility.check_same_weights("CKPT", {**config, "n_heads": "four"}, model)


GOOD_CHANGE = {"step": 3, "key": "seed", "saved": 1, "now": 2, "how": "allowed"}


@pytest.mark.parametrize(
    "changes",
    [{}, [1], [{**GOOD_CHANGE, "key": "lr"}], [{**GOOD_CHANGE, "how": "silent"}],
     [{**GOOD_CHANGE, "step": "3"}], [{k: v for k, v in GOOD_CHANGE.items() if k != "now"}]],
)  # fmt: skip
def test_recorded_changes_are_checked_before_they_are_carried_on(changes):
    assert compatibility.recorded_changes({}, "CKPT") == []  # a checkpoint from before the records
    assert compatibility.recorded_changes({"changes": [GOOD_CHANGE]}, "CKPT") == [GOOD_CHANGE]
    with pytest.raises(UserError, match="malformed changes"):
        compatibility.recorded_changes({"changes": changes}, "CKPT")


# ----------------------------------------------------------------------------- optimizer settings
# A resume trains with this run's weight decay, betas and eps (the saved moments carry over), and
# records each change. DeepSpeed's load_checkpoint used to put the checkpoint's param_groups back over
# them while the log and effective_config.json showed the new values.

SAVED = {"weight_decay": [0.05, 0.0], "betas": [[0.9, 0.95]] * 2, "eps": [1e-8] * 2,  # the recipe's
         "decoupled_weight_decay": [True] * 2, "fused": [True] * 2}  # fmt: skip


@pytest.fixture(scope="module")
def saved_runs(parts, dist_env):
    """ZeRO stage -> two steps of the bare base model at that stage, a checkpoint after each."""
    runs = {}

    def get(stage: int):
        if stage not in runs:
            runs[stage] = parts.root / f"saved_stage{stage}"
            assert train(parts.data_a, parts.bare, runs[stage], "--zero_stage", str(stage)) == 0
        return runs[stage]

    return get


def capture_engine(monkeypatch) -> dict:
    """{"engine": the engine the run trained with}, once the run has started."""
    from ds_sft.train import loop

    seen, start = {}, loop.start_engine

    def start_and_keep(*args, **kwargs):
        engine, state, identity = start(*args, **kwargs)
        seen["engine"] = engine
        return engine, state, identity

    monkeypatch.setattr(loop, "start_engine", start_and_keep)
    return seen


def recipe_with(tmp_path, **params) -> str:
    """The shipped recipe with other optimizer params, and "type" (a JSON the user would pass on resume)."""
    from importlib.resources import files

    config = json.loads((files("ds_configs") / "sft_recipe.json").read_text())
    config["optimizer"]["type"] = params.pop("type", config["optimizer"]["type"])
    config["optimizer"]["params"].update(params)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(config))
    return str(path)


OPTIMIZER_CASES = {  # flags, JSON params -> the settings the resumed optimizer must hold
    "weight_decay": (["--weight_decay", "0.5"], {}, {"weight_decay": [0.5, 0.0]}),
    "betas": ([], {"betas": [0.5, 0.6]}, {"betas": [[0.5, 0.6]] * 2}),
    "eps": ([], {"eps": 1e-3}, {"eps": [1e-3] * 2}),
    "all three": (["--weight_decay", "0.2"], {"betas": [0.8, 0.9], "eps": 1e-6},
                  {"weight_decay": [0.2, 0.0], "betas": [[0.8, 0.9]] * 2, "eps": [1e-6] * 2}),
    # the saved param_groups came back whole: the resumed run kept AdamW's decoupled decay, fused
    "L2 decay": ([], {"type": "Adam", "adam_w_mode": False}, {"decoupled_weight_decay": [False] * 2}),
    "unfused": ([], {"fused": False}, {"fused": [False] * 2}),
}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "case"), [(2, case) for case in OPTIMIZER_CASES] + [(0, "all three"), (3, "all three")]
)
def test_a_resume_trains_with_this_runs_optimizer_settings_and_records_them(
    parts, saved_runs, stage, case, tmp_path, capsys, monkeypatch, dist_env
):
    flags, params, changed = OPTIMIZER_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(saved_runs(stage), run)
    seen = capture_engine(monkeypatch)
    config = ["--deepspeed_config", recipe_with(tmp_path, **params)]
    assert train(parts.data_a, parts.bare, run, "--resume", "--zero_stage", str(stage), *config, *flags,
                 max_iters=3) == 0  # fmt: skip
    out = capsys.readouterr().out
    inner = seen["engine"].optimizer
    groups = getattr(inner, "optimizer", inner).param_groups
    now = {**SAVED, **changed}
    held = {key: [list(g[key]) if key == "betas" else g[key] for g in groups] for key in SAVED}
    assert held == now
    expected = [
        {"step": 2, "key": key, "saved": SAVED[key], "now": changed[key], "how": "optimizer"}
        for key in SAVED
        if key in changed
    ]
    state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["changes"] == expected
    report = (run / "report.md").read_text()
    for change, record in zip(expected, records(run, "change"), strict=True):
        line = compatibility.show(change["key"], change["saved"], change["now"])
        assert f"resume changes {line}" in out and f"- step 2: {line}" in report
        assert record == {"type": "change", **change, "message": record["message"]}


def test_a_resume_into_another_zero_stage_records_the_optimizer_change_too(
    parts, saved_runs, tmp_path, monkeypatch, dist_env
):
    """The state carried into an engine of another kind (state_transfer) is compared with the settings
    the checkpoint recorded in its trainer state."""
    run = tmp_path / "run"
    shutil.copytree(saved_runs(2), run)
    seen = capture_engine(monkeypatch)
    flags = ["--resume", "--zero_stage", "0", "--weight_decay", "0.5"]
    assert train(parts.data_a, parts.bare, run, *flags, max_iters=3) == 0
    inner = seen["engine"].optimizer
    assert [g["weight_decay"] for g in getattr(inner, "optimizer", inner).param_groups] == [0.5, 0.0]
    state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert {(c["key"], c["how"]) for c in state["changes"]} == {("zero_stage", "resumable"),
                                                                ("weight_decay", "optimizer")}  # fmt: skip
    assert state["optimizer"]["weight_decay"] == [0.5, 0.0]


def test_a_resumed_step_decays_by_this_runs_weight_decay(parts, saved_runs, tmp_path, dist_env):
    """The reference: AdamW's decoupled decay. Two resumes of the same checkpoint, weight decay 0.05
    (the saved run's) and 5, see the same gradients at step 3; torch's AdamW makes
    p (1 - lr wd) - lr m / (sqrt(v) + eps), so their weights differ by -lr (5 - 0.05) p on the decayed
    weights and not at all on the others (lr held at 1e-3 so that the difference stands far above
    fp32 rounding)."""
    from safetensors.torch import load_file

    finals = {}
    for wd in ("0.05", "5"):
        run = tmp_path / wd
        shutil.copytree(saved_runs(2), run)
        flags = ["--resume", "--weight_decay", wd, "--min_lr", "1e-3", "--allow_change", "schedule"]
        assert train(parts.data_a, parts.bare, run, *flags, max_iters=3) == 0
        finals[wd] = load_file(str(run / "final" / "model.safetensors"))
    lr = next(r["lr"] for r in records(tmp_path / "5", "train") if r["step"] == 3)
    assert lr == 1e-3
    before = load_file(str(saved_runs(2) / "final" / "model.safetensors"))
    decayed = set()
    for name, p in before.items():
        difference = finals["5"][name] - finals["0.05"][name]
        if difference.abs().max() > 0:
            decayed.add(name)
            assert torch.allclose(difference, -lr * 4.95 * p, rtol=1e-3, atol=1e-8), name
    assert decayed and decayed == {name for name in before if name.endswith("_proj.weight")}


def test_a_resume_of_an_l2_run_with_adamw_trains_and_records_decoupled_decay(
    parts, tmp_path, capsys, monkeypatch, dist_env
):
    """The other direction of "L2 decay" above: torch's AdamW reads the saved Adam's groups as decoupled,
    so the change is known only from what the checkpoint recorded it trained with."""
    run = tmp_path / "run"
    l2 = recipe_with(tmp_path, type="Adam", adam_w_mode=False)
    assert train(parts.data_a, parts.bare, run, "--deepspeed_config", l2) == 0
    seen = capture_engine(monkeypatch)
    assert train(parts.data_a, parts.bare, run, "--resume", max_iters=3) == 0
    inner = seen["engine"].optimizer
    assert [g["decoupled_weight_decay"] for g in getattr(inner, "optimizer", inner).param_groups] == [
        True
    ] * 2
    state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["changes"] == [{"step": 2, "key": "decoupled_weight_decay", "saved": [False] * 2,
                                 "now": [True] * 2, "how": "optimizer"}]  # fmt: skip


@pytest.mark.parametrize("key", compatibility.FIXED_OPTIMIZER_KEYS)
def test_an_optimizer_setting_adams_state_cannot_follow_is_refused(key):
    saved = {**SAVED, key: [False, False]}
    message = f"the optimizer's {key} was \\[False, False\\] and is \\[True, True\\]"
    with pytest.raises(UserError, match=message):
        compatibility.optimizer_changes("CKPT", saved, {**saved, key: [True, True]})
    assert compatibility.optimizer_changes("CKPT", saved, saved) == []


@pytest.mark.parametrize(
    ("change", "fine"),
    [({"key": "betas", "how": "optimizer"}, True), ({"key": "weight_decay", "how": "optimizer"}, True),
     ({"key": "seed", "how": "optimizer"}, False), ({"key": "betas", "how": "allowed"}, False),
     ({"key": "lr", "how": "optimizer"}, False)],
)  # fmt: skip
def test_recorded_optimizer_changes_are_checked_like_the_others(change, fine):
    state = {"changes": [{**GOOD_CHANGE, **change}]}
    if fine:
        assert compatibility.recorded_changes(state, "CKPT") == state["changes"]
    else:
        with pytest.raises(UserError, match="malformed changes"):
            compatibility.recorded_changes(state, "CKPT")


def test_the_base_weights_fingerprint_sees_the_weights_not_their_precision():
    model = tiny_model()
    same = compatibility.weights_fingerprint(model)
    assert compatibility.weights_fingerprint(tiny_model()) == same  # the same seed: the same weights
    with torch.no_grad():
        as_bf16 = tiny_model().to(torch.bfloat16)
        assert compatibility.weights_fingerprint(as_bf16) == same
        model.layers[0].attn.q_proj.weight[0, 0] += 1.0  # the first value of a tensor is in the sample
    assert compatibility.weights_fingerprint(model) != same


def test_the_fp8_layout_records_what_the_swap_made():
    """--fp8 auto and the recipe's select: "auto" resolve by machine; the flag stays "auto" while the
    projections that run in fp8 and their scaling change. The identity holds what a step computes."""
    from ds_sft.model.fp8 import apply_fp8, fp8_layout

    def layout(mode="torch", **recipe):
        from ds_sft.model.fp8 import Fp8Recipe

        model = apply_fp8(tiny_model(), mode, Fp8Recipe.from_dict(recipe), say=lambda line: None)
        return fp8_layout(model, recipe)

    assert fp8_layout(tiny_model(), {}) is None
    torch_all = layout()
    assert torch_all["mode"] == "torch" and torch_all["layers"] == 7 * tiny_model().config.n_layers
    assert torch_all["recipe"]["amax_history_len"] == 1024  # TE's default filled in: {} == that
    assert layout(amax_history_len=1024) == torch_all
    assert layout(margin=1) != torch_all and layout(format="E4M3") != torch_all
    line = compatibility.show("fp8_layout", None, torch_all)
    assert line.startswith("fp8_layout layers None -> 14, mode None -> torch, names None -> ")
    assert len(line.split("names None -> ")[1].split(",")[0]) == 12  # the digest shortened


def test_fp8_that_resolves_otherwise_at_resume_is_refused(
    parts, saved_run, tmp_path, capsys, monkeypatch, dist_env
):
    """The saved run trained its projections in fp32 (--fp8 auto on a CPU). Resumed where auto finds
    fp8 tensor cores (and, here, a roofline by which every projection pays), the same flag swapped
    every projection to fp8 and went on without a word."""
    import torch

    from ds_sft.model import fp8
    from ds_sft.model.fp8_roofline import Roofline

    monkeypatch.setattr(fp8, "has_fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(Roofline, "speedup", lambda self, m, k, n, mode: 2.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU with fp8 tensor cores")
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    capsys.readouterr()
    assert train(parts.data_a, parts.bare, run, "--resume", max_iters=3) == 2
    line = one_line_error(capsys)
    assert "fp8_layout layers None -> 14, mode None -> torch" in line
    assert (
        'resume where --fp8 and the JSON\'s "fp8" recipe give what they gave (no projection in fp8)' in line
    )
    assert not (run / "checkpoints" / "step_000003").exists()
