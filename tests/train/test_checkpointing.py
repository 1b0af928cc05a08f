"""Consolidated fp32 weights under bf16, checkpoint discovery and pruning, the state carried to
another ZeRO stage or precision, the NaN/Inf count of a loaded state."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import threading

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.run_layout import TRAINER_STATE
from ds_sft.train.checkpoint_check import damage, find_checkpoint
from ds_sft.train.checkpoint_load import non_finite_message, non_finite_values
from ds_sft.train.checkpointing import drop_later_tags, prune, replace_tag, save
from ds_sft.train.engine import build_engine
from ds_sft.train.final import consolidated_state_dict
from ds_sft.train.state_transfer import load_weights, read_state, write_state
from tests.train.helpers import TinyPacked, ds_config, settings, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_consolidation_returns_the_fp32_master_weights(stage, dist_env):
    s = settings(zero_stage=stage, precision="bf16")
    engine, _ = build_engine(tiny_model(), ds_config(s), s.weight_decay)
    torch.manual_seed(0)
    for _ in range(2):  # a few updates so the fp32 masters hold bits the bf16 copies cannot
        input_ids = torch.randint(0, 256, (2, 16))
        loss = engine(input_ids, labels=input_ids.roll(-1, dims=1))
        engine.backward(loss)
        engine.step()
    state = consolidated_state_dict(engine)
    module = dict(engine.module.named_parameters())
    assert set(state) == set(module)
    lost_bits = 0
    for name, master in state.items():
        assert master.dtype == torch.float32 and module[name].dtype == torch.bfloat16
        assert torch.equal(master.to(torch.bfloat16), module[name].detach())  # the bf16 copy rounds from it
        lost_bits += int((master != module[name].float()).sum())
    assert lost_bits > 0  # it is the master, not the bf16 weights cast up
    engine.destroy()


def make_tags(ckpt_dir, steps):
    """Tags holding only a well-formed trainer state (an empty file manifest: ZeRO 0's files are all in
    the model states, which :func:`list_files` may add)."""
    for step in steps:
        state = {
            "step": step,
            "world_size": 1,
            "zero_stage": 0,
            "nan_streak": 0,
            "train_tokens": 0,
            "elapsed_s": 0.0,
            "val_history": [],
            "sampler": {"epoch": 0, "consumed_samples": 0, "seed": 0},
            "files": {},
        }
        (ckpt_dir / f"step_{step:06d}").mkdir(parents=True)
        (ckpt_dir / f"step_{step:06d}" / TRAINER_STATE).write_text(json.dumps(state))
    (ckpt_dir / "latest").write_text(f"step_{steps[-1]:06d}")


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    make_tags(tmp_path, [10, 20, 30, 40])
    (tmp_path / "step_000050").mkdir()  # an incomplete save (no trainer state): not counted, not touched
    prune(tmp_path, keep_last=2, best_tag="step_000010")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step_000010",
        "step_000030",
        "step_000040",
        "step_000050",
    ]


@pytest.mark.parametrize("earlier", ["folder", "symlink", "file", "none"])
def test_replace_tag_swaps_in_the_new_folder_and_never_follows_a_symlink(tmp_path, earlier):
    """Whatever an earlier run left under the tag's name goes (a symlink itself, never its target);
    the new folder takes its place whole, and nothing else in the folder moves."""
    ckpt_dir, outside = tmp_path / "checkpoints", tmp_path / "outside"
    make_tags(ckpt_dir, [2, 4])
    outside.mkdir()
    (outside / "keep.pt").write_text("not ds-sft's")
    tag_dir = ckpt_dir / "step_000006"
    if earlier == "folder":
        tag_dir.mkdir()
        (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("stale")
    elif earlier == "symlink":
        tag_dir.symlink_to(outside, target_is_directory=True)
    elif earlier == "file":
        tag_dir.write_text("stale")
    new = ckpt_dir / ".partial" / "step_000006"
    new.mkdir(parents=True)
    (new / "mp_rank_00_model_states.pt").write_text("new")
    replace_tag(new, tag_dir)
    assert not tag_dir.is_symlink() and sorted(p.name for p in tag_dir.iterdir()) == [
        "mp_rank_00_model_states.pt"
    ]
    # a folder without a trainer state does not say which files are the run's: kept whole, renamed
    kept = ["step_000006.kept"] if earlier == "folder" else []
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        ".partial",
        "latest",
        "step_000002",
        "step_000004",
        "step_000006",
        *kept,
    ]
    assert (outside / "keep.pt").read_text() == "not ds-sft's"


def list_files(tag_dir, files: dict[str, bytes]) -> None:
    """Write ``files`` into a tag of :func:`make_tags` and list them in its trainer state."""
    state = json.loads((tag_dir / TRAINER_STATE).read_text())
    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / TRAINER_STATE).write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["prune", "drop_later_tags", "replace_tag"])
def test_a_tag_the_run_deletes_keeps_what_the_run_did_not_write(tmp_path, capsys, how):
    """Pruning, dropping a branched run's later tags and replacing a tag deleted the whole folder: a
    user's notes in it went too. Now the run's files go and the user's stay, in ``<tag>.kept``."""
    ckpt_dir, outside = tmp_path / "checkpoints", tmp_path / "outside"
    make_tags(ckpt_dir, [2, 4, 6])
    outside.mkdir()
    (outside / "target.pt").write_text("not ds-sft's")
    tag = "step_000002" if how == "prune" else "step_000006"
    list_files(ckpt_dir / tag, {"mp_rank_00_model_states.pt": b"weights", "optim_states.pt": b"moments"})
    (ckpt_dir / tag / "notes.txt").write_text("the user's")
    (ckpt_dir / tag / "link.pt").symlink_to(outside / "target.pt")
    if how == "prune":
        prune(ckpt_dir, keep_last=2, best_tag=None)
    elif how == "drop_later_tags":
        drop_later_tags(ckpt_dir, 4)
    else:
        new = ckpt_dir / ".partial" / tag
        new.mkdir(parents=True)
        (new / "mp_rank_00_model_states.pt").write_text("new")
        replace_tag(new, ckpt_dir / tag)
        assert sorted(p.name for p in (ckpt_dir / tag).iterdir()) == ["mp_rank_00_model_states.pt"]
    kept = ckpt_dir / f"{tag}.kept"
    assert sorted(p.name for p in kept.iterdir()) == ["link.pt", "notes.txt"]
    assert (kept / "notes.txt").read_text() == "the user's" and (
        kept / "link.pt"
    ).read_text() == "not ds-sft's"
    assert (how == "replace_tag") == (ckpt_dir / tag).exists()
    assert f"checkpoint {tag}: kept what the run did not write there" in capsys.readouterr().err


# What an earlier save may have left in checkpoints/.partial or .replaced: (file, is it ds-sft's).
LEFT_BEFORE_A_SAVE = {
    ".partial/step_000001/mp_rank_00_model_states.pt": True,  # a save cut short
    ".partial/zero_to_fp32.py": True,
    ".replaced/mp_rank_00_model_states.pt": True,  # a save killed before it deleted the replaced tag
    ".partial/notes.txt": False,
    ".partial/step_000001/notes.txt": False,
    ".replaced/thesis.tex": False,
}


@pytest.mark.parametrize("name", LEFT_BEFORE_A_SAVE)
def test_a_save_deletes_what_an_earlier_save_left_but_keeps_anything_else(tmp_path, capsys, dist_env, name):
    """F11: every save deleted checkpoints/.partial (and replace_tag .replaced) whatever they held. Now
    only ds-sft's files go; a folder holding anything else is moved whole to <name>.kept and named."""
    ckpt_dir = tmp_path / "checkpoints"
    make_tags(ckpt_dir, [2])  # step 2 is saved again: its old folder goes through .replaced
    (ckpt_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / name).write_text("someone's")
    s = settings(zero_stage=0)
    engine, _ = build_engine(tiny_model(), ds_config(s), s.weight_decay)
    state = json.loads((ckpt_dir / "step_000002" / TRAINER_STATE).read_text())
    try:
        save(engine, ckpt_dir, 2, {key: state[key] for key in state if key != "files"}, keep_last=2)
    finally:
        engine.destroy()
    scratch = name.split("/")[0]
    assert damage(ckpt_dir / "step_000002") is None
    assert not (ckpt_dir / scratch).exists()
    kept = ckpt_dir / f"{scratch}.kept" / name.split("/", 1)[1]
    if LEFT_BEFORE_A_SAVE[name]:
        assert not kept.exists()
    else:
        assert kept.read_text() == "someone's"
        assert f"note: kept {ckpt_dir / scratch}" in capsys.readouterr().err


def test_a_second_kept_folder_of_one_tag_takes_the_next_free_name(tmp_path):
    make_tags(tmp_path, [2, 4])
    (tmp_path / "step_000004.kept").mkdir()
    (tmp_path / "step_000004" / "notes.txt").write_text("the user's")
    drop_later_tags(tmp_path, 2)
    assert (tmp_path / "step_000004.kept2" / "notes.txt").read_text() == "the user's"


def test_drop_later_tags_removes_only_later_tags(tmp_path):
    """Tags after the step just saved go (folders, incomplete ones, symlinks without their targets);
    earlier tags and anything not named like a tag stay."""
    ckpt_dir, outside = tmp_path / "checkpoints", tmp_path / "outside"
    make_tags(ckpt_dir, [2, 4, 6, 8])
    (ckpt_dir / "step_000010").mkdir()  # a save the first run never finished
    outside.mkdir()
    (ckpt_dir / "step_000012").symlink_to(outside, target_is_directory=True)
    (ckpt_dir / "step_9").mkdir()  # not a tag ds-sft writes
    drop_later_tags(ckpt_dir, 4)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_000002", "step_000004", "step_9"]
    assert outside.is_dir()


def test_find_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert find_checkpoint(None, run) is None
    assert find_checkpoint("auto", run) is None  # --resume on a fresh run starts from step 0
    make_tags(run / "checkpoints", [5, 10])
    assert find_checkpoint("auto", run) == run / "checkpoints" / "step_000010"
    assert find_checkpoint(str(run / "checkpoints"), tmp_path) == run / "checkpoints" / "step_000010"
    assert find_checkpoint(str(run / "checkpoints" / "step_000005"), tmp_path).name == "step_000005"
    with pytest.raises(UserError, match="no complete checkpoint there"):
        find_checkpoint(str(tmp_path), tmp_path)


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


ZERO2_BF16_FILES = {"mp_rank_00_model_states.pt": {}, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": {}}
ZERO0_FILES = {"mp_rank_00_model_states.pt": {}}
ZERO3_FP32_FILES = {
    "zero_pp_rank_0_mp_rank_00_model_states.pt": {},
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": {},
}
HUGE = "1" * 5000  # past Python's 4,300-digit limit on int(str): JSON, but no number ds-sft reads


def replaced(old: str, new: str):
    """An edit of the trainer state's text."""
    return lambda text: text.replace(old, new, 1)


def stated(**fields):
    """An edit setting ``fields`` in the trainer state."""
    return lambda text: json.dumps({**json.loads(text), **fields})


# (the files a tag holds, an edit of its trainer_state.json text, what damage() then says)
EDITED_STATES = {
    "oversized nan_streak": (
        ZERO2_BF16_FILES,
        replaced('"nan_streak": 0', f'"nan_streak": {HUGE}'),
        "malformed",
    ),
    "oversized step": (ZERO2_BF16_FILES, replaced('"step": 4', f'"step": {HUGE}'), "malformed"),
    "oversized sampler seed": (ZERO0_FILES, replaced('"seed": 0', f'"seed": -{HUGE}'), "malformed"),
    "zero 0 over zero 2 files": (ZERO2_BF16_FILES, stated(zero_stage=0, run={"zero_stage": 0}), "ZeRO 1-3"),
    "zero 3 over zero 2 files": (ZERO2_BF16_FILES, stated(zero_stage=3, run={"zero_stage": 3}), "ZeRO 1-2"),
    "zero 2 over zero 0 files": (ZERO0_FILES, stated(zero_stage=2, run={"zero_stage": 2}), "ZeRO 0"),
    "zero 2 over zero 3 files": (ZERO3_FP32_FILES, stated(zero_stage=2, run={"zero_stage": 2}), "ZeRO 3"),
    "fp32 over bf16 files": (ZERO2_BF16_FILES, stated(run={"zero_stage": 2, "precision": "fp32"}), "bf16"),
    "bf16 over fp32 files": (ZERO3_FP32_FILES, stated(run={"zero_stage": 3, "precision": "bf16"}), "fp32"),
    "a float step count": (ZERO0_FILES, stated(nan_streak=1.5), "malformed"),
}


def genuine_kind(files: dict) -> dict:
    """The trainer-state fields of the engine that writes ``files`` (the inverse of the edits)."""
    stage = 3 if "zero_pp_rank_0_mp_rank_00_model_states.pt" in files else 2 if len(files) > 1 else 0
    precision = "bf16" if any(name.startswith("bf16_") for name in files) else "fp32"
    return {"zero_stage": stage, "run": {"zero_stage": stage, "precision": precision}}


@pytest.mark.parametrize("edit", EDITED_STATES)
def test_an_edited_trainer_state_is_skipped_by_resume_and_named_for_an_explicit_tag(tmp_path, capsys, edit):
    """F3: an oversized integer (a ValueError of json.loads) or a ZeRO stage / precision the files do
    not have was a traceback at --resume (in damage(), or deep in DeepSpeed's load): now damage() names
    it, --resume alone falls back to the intact tag, --resume TAG stops in one line."""
    files, rewrite, said = EDITED_STATES[edit]
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    make_tags(ckpt_dir, [2, 4])
    for tag in ("step_000002", "step_000004"):
        state_file = ckpt_dir / tag / TRAINER_STATE
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), **genuine_kind(files)}))
        list_files(ckpt_dir / tag, {name: pickled(obj) for name, obj in files.items()})
        assert damage(ckpt_dir / tag) is None
    edited = ckpt_dir / "step_000004" / TRAINER_STATE
    edited.write_text(rewrite(edited.read_text()))
    problem = damage(ckpt_dir / "step_000004")
    assert problem is not None and said in problem, problem
    assert find_checkpoint("auto", run) == ckpt_dir / "step_000002"
    assert f"skipping checkpoint {ckpt_dir / 'step_000004'}" in capsys.readouterr().err
    with pytest.raises(UserError) as refused:
        find_checkpoint(str(ckpt_dir / "step_000004"), tmp_path)
    assert "\n" not in str(refused.value) and "step_000004" in str(refused.value)


@pytest.mark.parametrize("first", [8, 999_997, 9_999_997, 99_999_997, 2**31 - 4])
def test_tags_are_ordered_by_step_across_a_change_of_digit_count(tmp_path, first):
    """Tags are step_ plus at least six digits, so past 999,999 steps their names no longer sort as
    their steps do: pruning, the --resume fallback and the NaN refusal's pointer rank them by step."""
    steps = [first + i for i in range(4)]
    ckpt_dir = tmp_path / "run" / "checkpoints"
    make_tags(ckpt_dir, steps)
    (ckpt_dir / "latest").unlink()  # --resume alone then falls back to the newest tag
    assert find_checkpoint("auto", tmp_path / "run").name == f"step_{steps[-1]:06d}"
    message = non_finite_message(ckpt_dir / f"step_{steps[-1]:06d}", 1, 0)
    assert f"--resume {ckpt_dir / f'step_{steps[-2]:06d}'}" in message
    prune(ckpt_dir, keep_last=2, best_tag=None)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(f"step_{step:06d}" for step in steps[2:])


def test_the_nan_refusal_of_a_tag_folder_of_any_name_is_one_line(tmp_path):
    """--resume PATH takes a copied tag folder whatever its name; no tag beside it counts as earlier."""
    make_tags(tmp_path, [5, 10])
    (tmp_path / "step_000010").rename(tmp_path / "my backup")
    message = non_finite_message(tmp_path / "my backup", 0, 3)
    assert f"no earlier intact checkpoint is left in {tmp_path}" in message and "\n" not in message


# Resuming with another ZeRO stage or precision (ds_sft.train.state_transfer): an engine of one kind
# trains a few steps; its state, read by parameter name, is written into an engine of another kind.
KINDS = [(stage, precision) for precision in ("fp32", "bf16") for stage in range(4)]
FAST_PAIRS = [((0, "fp32"), (3, "fp32")), ((3, "fp32"), (1, "fp32")), ((2, "bf16"), (0, "bf16"))]
FAST_PAIRS += [((1, "fp32"), (2, "bf16")), ((3, "bf16"), (0, "fp32")), ((0, "bf16"), (3, "fp32"))]
ROWS = TinyPacked(12, 3)


def engine_of(kind, model):
    s = settings(zero_stage=kind[0], precision=kind[1], grad_accum=1)
    return build_engine(model, ds_config(s), s.weight_decay)[0]


def train_steps(engine, steps) -> list[float]:
    """One micro-batch of 2 rows per step, the token-normalized loss of each."""
    losses = []
    for step in steps:
        rows = [ROWS[(2 * step + i) % len(ROWS)] for i in range(2)]
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        tokens = int((batch["labels"] != -100).sum())
        loss = engine(batch["input_ids"], batch["position_ids"], batch["document_ids"], batch["labels"])
        engine.backward(loss / tokens)
        engine.step()
        losses.append(loss.item() / tokens)
    return losses


@functools.cache
def trained(kind) -> tuple[dict, list[float]]:
    """The state of an engine of ``kind`` after 3 steps, and the losses of its next 2."""
    engine = engine_of(kind, tiny_model(0))
    train_steps(engine, range(3))
    state = read_state(engine)
    after = train_steps(engine, range(3, 5))
    engine.destroy()
    return state, after


def pair_params(pairs):
    fast = [pytest.param(a, b, id=f"zero{a[0]}-{a[1]}-to-zero{b[0]}-{b[1]}") for a, b in pairs]
    slow = [
        pytest.param(a, b, id=f"zero{a[0]}-{a[1]}-to-zero{b[0]}-{b[1]}", marks=pytest.mark.matrix)
        for a in KINDS
        for b in KINDS
        if a != b and (a, b) not in pairs
    ]
    return fast + slow


@pytest.mark.parametrize("before,after", pair_params(FAST_PAIRS))
def test_another_stage_or_precision_gets_the_state_bit_for_bit(before, after, dist_env):
    """The new engine holds the saved fp32 masters, Adam moments and step exactly, and, in the same
    precision, continues as the old one did (fp32: <= 5.7e-7 measured, the order of ZeRO 3's sums;
    bf16: equal losses measured); a precision change is exact in the state, not in the arithmetic."""
    state, expected = trained(before)
    model = tiny_model(1)  # other weights: everything must come from the state
    load_weights(model, state)
    engine = engine_of(after, model)
    write_state(engine, state)
    carried = read_state(engine)
    # Adam's own count, carried as is: 3 updates at every stage and precision (engine.build_engine
    # undoes the step bf16 stage 0's FP16_UnfusedOptimizer takes on zero gradients when it is built)
    assert carried["step"] == state["step"] == 3
    assert carried["params"].keys() == state["params"].keys()
    for name, entry in state["params"].items():
        assert entry.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            assert torch.equal(carried["params"][name][key], value), f"{name} {key}"
    losses = train_steps(engine, range(3, 5))
    engine.destroy()
    if before[1] == after[1]:
        assert losses == pytest.approx(expected, abs=1e-6, rel=0)


# A resumed state with NaN/Inf in it is refused (checkpoint_load.load): the count must reach every
# layout's weights and optimizer state. One value is poisoned through write_state (which writes each
# layout's own masters and moments) or straight into the module's copy; it must be counted once.
POISONED = ["master", "moment", "module"]
FAST_POISON = {((0, "fp32"), "master"), ((2, "bf16"), "moment"), ((3, "fp32"), "module")}
FAST_POISON |= {((0, "bf16"), "module"), ((3, "bf16"), "master"), ((1, "fp32"), "moment")}


@pytest.mark.parametrize(
    "kind,place",
    [
        pytest.param(kind, place, id=f"zero{kind[0]}-{kind[1]}-{place}",
                     marks=[] if (kind, place) in FAST_POISON else pytest.mark.matrix)
        for kind in KINDS
        for place in POISONED
    ],
)  # fmt: skip
def test_non_finite_values_counts_each_poisoned_value_once(kind, place, dist_env):
    engine = engine_of(kind, tiny_model(0))
    train_steps(engine, range(1))
    assert non_finite_values(engine) == [0, 0]
    name, param = next(iter(engine.module.named_parameters()))
    if place == "module":
        with torch.no_grad():
            getattr(param, "ds_tensor", param).view(-1)[0] = float("nan")
    else:
        state = read_state(engine)
        key = "fp32" if place == "master" else "exp_avg_sq"
        state["params"][name][key].view(-1)[0] = float("inf")
        write_state(engine, state)
    counts = non_finite_values(engine)
    engine.destroy()
    assert counts == ([0, 1] if place == "moment" else [1, 0])


# What a user (or a copy gone wrong) may leave where a run reads a file back by name. A FIFO blocked
# the open until a writer came, forever in a run folder no one writes into, and SIGTERM could not end
# it (its handler returns into the open): at the first save after a resume (replacing the old tag), in
# `ds-sft export/eval --base_model RUN` (final/'s "checkpoints went on since" note), at `--resume`.
NOT_FILES = ["fifo", "symlink to a fifo", "folder", "device"]


def put_not_a_file(path, kind: str, tmp_path) -> list:
    """Replace ``path`` with a thing of ``kind``; the FIFOs made, for :func:`without_blocking`."""
    path.unlink(missing_ok=True)
    fifo = tmp_path / "elsewhere.fifo" if kind == "symlink to a fifo" else path
    if "fifo" in kind:
        os.mkfifo(fifo)
    if kind == "symlink to a fifo":
        path.symlink_to(fifo)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/null")
    return [fifo] if "fifo" in kind else []


def without_blocking(call, fifos: list, seconds: float = 20):
    """``call()``'s result; a call still blocked after ``seconds`` (an open of a FIFO) is released, by
    opening the FIFOs' writing ends, and fails the test."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"blocked reading {fifos}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("kind", NOT_FILES)
def test_a_latest_that_is_not_a_file_names_no_tag_and_never_blocks(tmp_path, kind):
    from ds_sft.data.model_match import behind_note
    from ds_sft.run_layout import latest_tag

    run = tmp_path / "run"
    make_tags(run / "checkpoints", [2, 4])
    fifos = put_not_a_file(run / "checkpoints" / "latest", kind, tmp_path)
    assert without_blocking(lambda: latest_tag(run / "checkpoints"), fifos) is None
    resumed = without_blocking(lambda: find_checkpoint("auto", run), fifos)
    assert resumed == run / "checkpoints" / "step_000004"  # the newest intact tag
    note = without_blocking(lambda: behind_note((run / "final" / "trained_on.json", {"step": 2})), fifos)
    assert note is None  # no step to compare with


@pytest.mark.parametrize("kind", NOT_FILES)
@pytest.mark.parametrize("how", ["drop_later_tags", "replace_tag"])
def test_a_tag_whose_trainer_state_is_not_a_file_is_kept_whole_without_blocking(tmp_path, kind, how):
    """A resumed run's first save replaces (or drops) the old tags after it: each is deleted by the
    list in its trainer_state.json, which was opened whatever it was."""
    from ds_sft.train.trainer_state import read_trainer_state

    ckpt_dir = tmp_path / "checkpoints"
    make_tags(ckpt_dir, [2, 4, 6])
    tag = ckpt_dir / "step_000006"
    fifos = put_not_a_file(tag / TRAINER_STATE, kind, tmp_path)
    with pytest.raises(OSError):
        without_blocking(lambda: read_trainer_state(tag), fifos)
    if how == "drop_later_tags":
        without_blocking(lambda: drop_later_tags(ckpt_dir, 4), fifos)
        assert not os.path.lexists(tag)
    else:
        new = ckpt_dir / ".partial" / tag.name
        new.mkdir(parents=True)
        (new / "mp_rank_00_model_states.pt").write_text("new")
        without_blocking(lambda: replace_tag(new, tag), fifos)
        assert sorted(p.name for p in tag.iterdir()) == ["mp_rank_00_model_states.pt"]
    kept = ckpt_dir / "step_000006.kept" / TRAINER_STATE  # which files were the run's is not known
    assert os.path.lexists(kept) and kept.is_symlink() == ("symlink" in kind or kind == "device")  # as left
