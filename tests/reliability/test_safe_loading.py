"""Loading a checkpoint never runs code from it, and a damaged file is named, not a traceback.

A ``.pt`` file is a pickle, and unpickling can call any importable function: a checkpoint downloaded
from the internet could run ``os.system``. ``load_model`` must refuse such files (torch's
``weights_only`` unpickler or safetensors only), in every on-disk flavour of pickle, with a
:class:`UserError` that says why, and the payload must never run. Each payload here would create a
sentinel file if executed, so "it did not run" is checked, not assumed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ds_sft import run_layout
from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model, save_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from tests.gguf_files import write_gguf

from .conftest import Payload


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny")).state_dict()


def _write_zip(path: Path, obj) -> None:
    torch.save(obj, path)


def _write_legacy(path: Path, obj) -> None:  # torch < 1.6's format, still common for old .pt/.bin
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _write_raw_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


WRITERS = {"zip": _write_zip, "legacy": _write_legacy, "raw-pickle": _write_raw_pickle}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, writer, suffix):
    sentinel = tmp_path / "payload_ran"
    path = tmp_path / f"evil{suffix}"
    WRITERS[writer](path, {"model": _tiny_state(), "trainer": Payload(sentinel)})

    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert not sentinel.exists(), "unpickling ran the checkpoint's code"
    assert "\n" not in message
    assert str(path) in message and "weights_only" in message and "safetensors" in message


def test_refusal_names_the_offending_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _tiny_state(), "trainer": Payload(tmp_path / "ran")}, path)
    with pytest.raises(UserError, match=r"(io|builtins)\.open"):
        load_model(path)


@pytest.mark.parametrize("writer", ["zip", "legacy"])
def test_plain_state_dicts_load_in_both_torch_formats(tmp_path, writer):
    """The positive control: refusing code must not refuse honest checkpoints."""
    state = _tiny_state()
    path = tmp_path / "model.pt"
    WRITERS[writer](path, {"model": state, "model_args": {"n_heads": 4, "n_kv_heads": 2}})
    loaded = load_model(path).state_dict()
    for name, tensor in state.items():
        if name in loaded:
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    state = _tiny_state()
    model_dir = save_model(LlamaModel(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    good_pt = tmp_path / "good.pt"
    torch.save(state, good_pt)
    files = {
        "empty .pt": b"",
        "truncated .pt": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "random bytes .pt": bytes(range(256)) * 4,
        "truncated .safetensors": (model_dir / "model.safetensors").read_bytes()[:1000],
        "zeros .safetensors": b"\0" * 64,
    }
    out = {}
    for label, data in files.items():
        path = tmp_path / label.replace(" ", "_").replace("_.", ".")
        path.write_bytes(data)
        out[label] = path
    truncated_dir = tmp_path / "truncated_dir"
    truncated_dir.mkdir()
    (truncated_dir / "model_config.json").write_text((model_dir / "model_config.json").read_text())
    (truncated_dir / "model.safetensors").write_bytes(files["truncated .safetensors"])
    out["ds-sft dir with truncated weights"] = truncated_dir
    return out


def test_damaged_checkpoint_files_are_one_clear_error(tmp_path):
    for label, path in _damaged_files(tmp_path).items():
        with pytest.raises(UserError) as err:
            load_model(path)
        message = str(err.value)
        assert "\n" not in message, label
        assert str(path) in message and ("corrupt" in message or "truncated" in message), (label, message)


@pytest.mark.parametrize("kept", [0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_a_truncated_gguf_is_one_clear_error(tmp_path, kept):
    """transformers parses GGUF without catching: cut in the header, the metadata, the tensor list or
    the data, it raised struct.error, IndexError or ValueError tracebacks."""
    tensors = {"token_embd.weight": np.arange(4096, dtype=np.float32).reshape(64, 64)}
    data = write_gguf(tmp_path / "whole.gguf", tensors=tensors).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * kept)])
    expected = r"cut\.gguf: not a readable GGUF file, truncated or corrupt \(.*\); download"
    with pytest.raises(UserError, match=expected):
        load_model(path)


# ----------------------------------------------------------------------------- training checkpoints
#
# DeepSpeed unpickles its own files with weights_only=False. Every file a resume loads (model states,
# optimizer states, the universal conversion's files, the ZeRO-3 repair file) must go through torch's
# weights_only unpickler all the same. The payloads below are the usual tricks; each would create a
# marker file if it ever ran.


def _reduce_to(call, *args):
    """An object whose unpickling calls ``call(*args)``."""
    return type("Evil", (), {"__reduce__": lambda self: (call, args)})()


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _partial_payload(marker: Path):
    """functools.partial built by one reduce, then called by another: no single global looks like code."""
    import functools

    return _reduce_to(functools.partial(open, str(marker), "w"))


def _numpy_payload(marker: Path):
    from numpy.testing._private.utils import runstring  # exec()s a string; its name looks like numpy

    return _reduce_to(runstring, _code(marker), {})


def _torch_payload(marker: Path):
    from torch.fx.graph_module import _exec_with_source  # exec()s a string; its name looks like torch

    return _reduce_to(_exec_with_source, _code(marker), {})


PAYLOADS = {
    "os.system": lambda marker: _reduce_to(__import__("os").system, f"touch {marker}"),
    "subprocess.Popen": lambda marker: _reduce_to(__import__("subprocess").Popen, ["touch", str(marker)]),
    "builtins.eval": lambda marker: _reduce_to(eval, _code(marker)),
    "builtins.exec": lambda marker: _reduce_to(exec, _code(marker)),
    "builtins.open": lambda marker: Payload(marker),
    "functools.partial": _partial_payload,
    "numpy-looking": _numpy_payload,
    "torch-looking": _torch_payload,
}


def _nest(obj, payload, depth: int = 0):
    """Put ``payload`` as deep inside ``obj``'s dicts as they go (optimizer state sits 3-4 levels down)."""
    inner = [v for v in (obj.values() if isinstance(obj, dict) else obj) if isinstance(v, dict | list)]
    if inner and depth < 6:
        _nest(inner[-1], payload, depth + 1)
    elif isinstance(obj, dict):
        obj["payload"] = payload
    else:
        obj.append(payload)


def _plant(path: Path, payload) -> None:
    """Rewrite a genuine checkpoint file (trusted here: the test wrote it) with ``payload`` nested in it."""
    state = torch.load(path, weights_only=False)
    _nest(state, payload)
    torch.save(state, path)


def _engine(stage: int, universal: bool = False):
    from ds_sft.train.engine import build_engine
    from tests.train.helpers import ds_config, settings, tiny_model

    s = settings(zero_stage=stage)
    extra = {"checkpoint": {"load_universal": True}} if universal else {}
    return build_engine(tiny_model(), ds_config(s, **extra), s.weight_decay)[0]


TRAINER_STATE = {
    "step": 1,
    "best_val": None,
    "best_tag": None,
    "val_history": [],
    "nan_streak": 0,
    "train_tokens": 64,
    "elapsed_s": 0.5,
    "sampler": {"epoch": 0, "consumed_samples": 4, "seed": 0},
    "world_size": 1,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, dist_env):
    """{stage: tag dir} of a genuine one-step ZeRO 1/2/3 checkpoint each, saved the trainer's way."""
    from ds_sft.train import checkpointing

    root = tmp_path_factory.mktemp("checkpoints")
    tags = {}
    for stage in (1, 2, 3):
        engine = _engine(stage)
        for _ in range(engine.gradient_accumulation_steps()):  # one optimizer step: moments exist
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(stage))
            engine.backward(engine(ids, labels=ids.roll(-1, dims=1)))
            engine.step()
        assert engine.global_steps == 1
        ckpt_dir = root / f"zero{stage}" / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        tag = checkpointing.save(engine, ckpt_dir, 1, {**TRAINER_STATE, "zero_stage": stage}, keep_last=2)
        engine.destroy()
        tags[stage] = ckpt_dir / tag
    return tags


def _try_load(stage: int, tag_dir: Path, universal: bool):
    """What ``checkpoint_load.load`` gives a fresh engine: the trainer state, or the exception it raised."""
    from ds_sft.train import checkpoint_load

    engine = _engine(stage, universal=universal)
    try:
        return checkpoint_load.load(engine, tag_dir, tag_dir.parent if universal else None)
    except Exception as err:  # the caller checks the marker first, then what was raised
        return err
    finally:
        engine.destroy()


def _copy_tag(tag_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoints" / tag_dir.name
    shutil.copytree(tag_dir, copy)
    return copy


def _bless(tag_dir: Path) -> None:
    """Rewrite the sha256 manifest over planted files, as an attacker with write access would."""
    from ds_sft.train import checkpoint_check, trainer_state

    state = trainer_state.read_trainer_state(tag_dir)
    state["files"] = checkpoint_check.file_digests(tag_dir)
    (tag_dir / run_layout.TRAINER_STATE).write_text(json.dumps(state))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_no_payload_in_any_checkpoint_file_runs_under_the_resume_unpickler(
    checkpoints, tmp_path, stage, payload
):
    """Every file of a ZeRO 1/2/3 tag x every payload: the opcode scan names it, the loader refuses it."""
    from ds_sft.train import checkpoint_check, checkpoint_load

    marker = tmp_path / "payload_ran"
    for genuine in sorted(checkpoints[stage].glob("*.pt")):
        tag_dir = _copy_tag(checkpoints[stage], tmp_path / genuine.name)
        victim = tag_dir / genuine.name
        _plant(victim, PAYLOADS[payload](marker))
        _bless(tag_dir)
        problem = checkpoint_check.damage(tag_dir)
        assert problem is not None and victim.name in problem and "no checkpoint holds" in problem, problem
        with checkpoint_load.weights_only_unpickling(), pytest.raises(pickle.UnpicklingError):
            torch.load(victim, weights_only=False)  # what DeepSpeed passes
        assert not marker.exists(), f"{payload} in {victim.name} ran"


POSITIONS = ["model_states", "optim_states", "optim_states via ds_to_universal"]


@pytest.mark.parametrize("payload", ["os.system", "functools.partial"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_engine_load_never_unpickles_code(checkpoints, tmp_path, stage, position, payload):
    """checkpoint_load.load itself, without the opcode scan in front: DeepSpeed's loads are weights_only."""

    marker = tmp_path / "payload_ran"
    tag_dir = _copy_tag(checkpoints[stage], tmp_path)
    victim = next(tag_dir.glob(f"*{position.split()[0]}.pt"))
    _plant(victim, PAYLOADS[payload](marker))
    outcome = _try_load(stage, tag_dir, universal="universal" in position)
    assert not marker.exists(), f"{payload} in {victim.name} ran"
    assert isinstance(outcome, UserError), outcome
    message = str(outcome)
    assert "\n" not in message and str(tag_dir) in message and "weights_only" in message, message
    assert not list(tag_dir.parent.glob(".universal-*")), "the conversion's folder was left behind"


@pytest.mark.parametrize(("saved", "engine_stage"), [(2, 0), (3, 1), (1, 3)])
def test_a_checkpoint_deepspeed_cannot_load_is_one_line_naming_it(checkpoints, tmp_path, saved, engine_stage):
    """F3: files of another ZeRO stage than the engine's (a trainer state edited to say so) made
    DeepSpeed's load raise deep inside (TypeError, KeyError...): now one line naming the tag."""
    tag_dir = _copy_tag(checkpoints[saved], tmp_path)
    outcome = _try_load(engine_stage, tag_dir, universal=False)
    assert isinstance(outcome, UserError), repr(outcome)
    message = str(outcome)
    assert "\n" not in message and f"could not load the checkpoint {tag_dir}" in message, message


def test_the_universal_conversion_is_written_into_the_resuming_runs_folder(
    checkpoints, tmp_path, monkeypatch
):
    """F12: a resume on another world size converted the --resume checkpoint beside it, into another
    run's folder (live, read-only or shared, and not locked by this run). Now into this run's own
    checkpoints/; a folder that cannot be made there is one line (it was a traceback outside the try,
    leaving the other ranks waiting at the broadcast)."""
    from ds_sft.train import checkpoint_load
    from ds_sft.train.checkpointing import UNIVERSAL_PREFIX

    source = _copy_tag(checkpoints[2], tmp_path / "other_run")
    before = sorted(p.name for p in source.parent.iterdir())
    converted = []
    remove = checkpoint_load.remove_universal
    monkeypatch.setattr(
        checkpoint_load, "remove_universal", lambda folder: (converted.append(folder), remove(folder))
    )
    own = tmp_path / "this_run" / "checkpoints"
    engine = _engine(2, universal=True)
    try:
        assert checkpoint_load.load(engine, source, own)["step"] == 1
        (folder,) = converted
        assert folder.parent.parent == own and folder.parent.name.startswith(UNIVERSAL_PREFIX)
        assert sorted(p.name for p in source.parent.iterdir()) == before and not list(own.iterdir())
        blocked = tmp_path / "a_file"
        blocked.write_text("not a folder")
        with pytest.raises(UserError) as refused:
            checkpoint_load.load(engine, source, blocked / "checkpoints")
        assert "\n" not in str(refused.value) and "could not convert" in str(refused.value)
    finally:
        engine.destroy()


def _plant_universal_folder(tag_dir: Path, marker: Path) -> Path:
    """A ``<tag>_universal/`` beside the tag, as old ds-sft versions kept it, every file booby-trapped."""
    planted = tag_dir.with_name(tag_dir.name + "_universal")
    (planted / "zero" / "wte.weight").mkdir(parents=True)
    for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
        torch.save({"param": PAYLOADS["os.system"](marker)}, planted / "zero" / "wte.weight" / name)
    torch.save(
        {"optimizer_state_dict": PAYLOADS["os.system"](marker)}, planted / "zero" / "optimizer_state.pt"
    )
    for model_states in tag_dir.glob("*model_states.pt"):
        torch.save({"module": PAYLOADS["os.system"](marker)}, planted / model_states.name)
    return planted


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_planted_universal_folder_is_neither_loaded_nor_deleted(checkpoints, tmp_path, stage):
    """A resume on another world size rebuilds the conversion in a fresh folder of its own (and removes
    that one); the folder it did not write stays as it was, unread."""

    marker = tmp_path / "payload_ran"
    tag_dir = _copy_tag(checkpoints[stage], tmp_path)
    planted = _plant_universal_folder(tag_dir, marker)
    before = sorted(p.relative_to(planted) for p in planted.rglob("*"))
    state = _try_load(stage, tag_dir, universal=True)
    assert not marker.exists(), "the planted universal folder was unpickled"
    assert isinstance(state, dict) and state["step"] == 1, state
    assert sorted(p.relative_to(planted) for p in planted.rglob("*")) == before
    assert sorted(p.name for p in tag_dir.parent.iterdir()) == [tag_dir.name, planted.name]


def test_the_zero3_repair_file_is_read_with_the_weights_only_unpickler(tmp_path):
    from ds_sft.train import checkpoint_load

    marker = tmp_path / "payload_ran"
    for payload in PAYLOADS.values():
        (tmp_path / "zero").mkdir(exist_ok=True)
        torch.save({"optimizer_state_dict": payload(marker)}, tmp_path / "zero" / "optimizer_state.pt")
        optimizer = SimpleNamespace(optimizer=SimpleNamespace(state={}, param_groups=[]))
        with checkpoint_load.weights_only_unpickling(), pytest.raises(pickle.UnpicklingError):
            checkpoint_load.repair_zero3_universal_load(optimizer, tmp_path)
        assert not marker.exists()


HOSTILE_STATES = {
    "step is a string": {"step": "1"},
    "negative step": {"step": -1},
    "world size 0": {"world_size": 0},
    "world size a float": {"world_size": 2.0},
    "zero stage 4": {"zero_stage": 4},
    "zero stage a bool": {"zero_stage": True},
    "best tag leads elsewhere": {"best_tag": "../../elsewhere"},
    "sampler a list": {"sampler": [0, 4, 0]},
    "negative consumed samples": {"sampler": {"epoch": 0, "consumed_samples": -4, "seed": 0}},
    "val history of strings": {"val_history": ["1.0"]},
    "elapsed infinite": {"elapsed_s": float("inf")},
    "a file outside the tag": {"files": {"../latest": {"bytes": 1, "sha256": "0" * 64}}},
    "a digest that is not hex": {"files": {"x.pt": {"bytes": 1, "sha256": "zz"}}},
    "files a list": {"files": ["x.pt"]},
    "not an object": None,
    "run a string": {"run": "x"},
    "run null": {"run": None},
    "run a list": {"run": [1]},
    "run at another zero stage": {"run": {"zero_stage": 7}},
    "run at a zero stage the state does not say": {"run": {"zero_stage": 3}},
    "run in fp16": {"run": {"precision": "fp16"}},
    "run seed not the sampler's": {"run": {"seed": 5}},
    "run seed a string": {"run": {"seed": "5"}},
    "run model a list": {"run": {"model": [1]}},
    "val sample a list": {"val_sample": [0, 1]},
    "val sample rows unsorted": {"val_sample": {"data": None, "count": 4, "rows": [3, 1]}},
    "val sample rows repeated": {"val_sample": {"data": None, "count": 4, "rows": [1, 1]}},
    "val sample rows negative": {"val_sample": {"data": None, "count": 4, "rows": [-1, 0]}},
    "val sample rows empty": {"val_sample": {"data": None, "count": 4, "rows": []}},
    "val sample rows strings": {"val_sample": {"data": None, "count": 4, "rows": ["0"]}},
    "val sample count 0": {"val_sample": {"data": None, "count": 0, "rows": [0]}},
    "max iters 0": {"max_iters": 0},
    "max iters a float": {"max_iters": 4.0},
}


@pytest.mark.parametrize("change", HOSTILE_STATES)
def test_a_hostile_trainer_state_is_refused_as_malformed(checkpoints, tmp_path, change):
    from ds_sft.train import checkpoint_check

    tag_dir = _copy_tag(checkpoints[2], tmp_path)
    state_file = tag_dir / run_layout.TRAINER_STATE
    state = json.loads(state_file.read_text())
    hostile = None if HOSTILE_STATES[change] is None else {**state, **HOSTILE_STATES[change]}
    state_file.write_text(json.dumps(hostile))
    problem = checkpoint_check.damage(tag_dir)
    assert problem is not None and "malformed" in problem, (change, problem)
    with pytest.raises(UserError, match="malformed") as err:
        checkpoint_check.find_checkpoint(str(tag_dir), tmp_path)
    assert "\n" not in str(err.value)


def test_a_genuine_trainer_state_passes_and_an_unlisted_file_does_not(checkpoints, tmp_path):
    from ds_sft.train import checkpoint_check

    tag_dir = _copy_tag(checkpoints[3], tmp_path)
    assert checkpoint_check.damage(tag_dir) is None
    (tag_dir / "extra_optim_states.pt").write_bytes(b"")
    problem = checkpoint_check.damage(tag_dir)
    assert "extra_optim_states.pt is not among the regular files it was saved with" in problem


def _fifo(path: Path) -> None:
    os.mkfifo(path)


UNLISTED_ENTRIES = {
    "a FIFO": lambda tag_dir: _fifo(tag_dir / "extra.pt"),
    "a folder": lambda tag_dir: (tag_dir / "extra.pt").mkdir(),
    "a link to a device": lambda tag_dir: (tag_dir / "extra.pt").symlink_to("/dev/zero"),
    "a link to a FIFO": lambda tag_dir: (
        _fifo(tag_dir.parent / "fifo"),
        (tag_dir / "extra.pt").symlink_to(tag_dir.parent / "fifo"),
    ),
    "a dangling link": lambda tag_dir: (tag_dir / "extra.pt").symlink_to(tag_dir / "nowhere"),
}


@pytest.mark.parametrize("entry", UNLISTED_ENTRIES)
def test_an_unlisted_entry_of_any_kind_is_refused_without_being_opened(checkpoints, tmp_path, entry):
    """Only files were compared with the list, so a FIFO named ``*.pt`` reached the pickle check,
    which opened it and blocked forever. Run in a thread: a regression fails here instead of hanging."""
    from ds_sft.train import checkpoint_check

    tag_dir = _copy_tag(checkpoints[3], tmp_path)
    UNLISTED_ENTRIES[entry](tag_dir)
    found = []
    worker = threading.Thread(target=lambda: found.append(checkpoint_check.damage(tag_dir)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # blocked opening the FIFO: a writer lets it go on
        os.close(os.open(tag_dir.parent / "fifo" if entry == "a link to a FIFO" else tag_dir / "extra.pt",
                         os.O_WRONLY | os.O_NONBLOCK))  # fmt: skip
        worker.join(timeout=60)
        pytest.fail("damage() opened an unlisted FIFO and blocked")
    assert found == ["extra.pt is not among the regular files it was saved with"]


def test_a_listed_file_replaced_by_a_link_is_foreign_to_every_reader_of_a_tag(checkpoints, tmp_path):
    """One rule says which entries of a tag are the run's: resume (damage), --overwrite (tag_problem)
    and pruning (remove_tag). damage() followed a link put in place of a listed file: a link to an
    identical copy hashed equal and was resumed from; the other two refused it."""
    from ds_sft.train import checkpoint_check, checkpointing, run_dir, trainer_state

    tag_dir = _copy_tag(checkpoints[3], tmp_path)
    listed = sorted(trainer_state.read_trainer_state(tag_dir)["files"])
    name = listed[0]
    copy = tmp_path / "elsewhere" / name
    copy.parent.mkdir()
    (tag_dir / name).rename(copy)
    (tag_dir / name).symlink_to(copy)
    assert checkpoint_check.damage(tag_dir) == f"{name} is not among the regular files it was saved with"
    assert name in run_dir.tag_problem(tag_dir, tmp_path)
    checkpointing.remove_tag(tag_dir)
    kept = tag_dir.with_name(f"{tag_dir.name}.kept")
    assert sorted(p.name for p in kept.iterdir()) == [name] and (kept / name).is_symlink()
    assert copy.is_file(), "the link's target is not the run's to delete"


def test_a_name_with_a_newline_stays_on_one_line(checkpoints, tmp_path):
    """A file name can hold a newline: quoted in a message, it must not start a line that reads like
    one of ds-sft's own (``warning: ...``)."""
    from ds_sft.command import execute
    from ds_sft.train import checkpoint_check

    tag_dir = _copy_tag(checkpoints[3], tmp_path)
    (tag_dir / "evil\nwarning: all good, resuming.pt").write_bytes(b"")
    module = SimpleNamespace(run=lambda args: checkpoint_check.find_checkpoint(str(tag_dir), tmp_path))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert execute("ds-sft train", module, SimpleNamespace()) == 2
    assert stderr.getvalue().count("\n") == 1 and "evil\\nwarning: all good" in stderr.getvalue()


@pytest.mark.parametrize(
    "latest",
    # the last two: more digits than any step (2^31 - 1 at most) -- a name past the file system's limit
    # stopped the resume on ENAMETOOLONG instead of falling back to the tags themselves
    ["../../elsewhere/step_000001", "/tmp", "step_1; rm", "", "step_" + "9" * 300, "step_" + "1" * 11],
)
def test_latest_names_a_tag_or_nothing(checkpoints, tmp_path, latest):
    from ds_sft.train import checkpoint_check

    tag_dir = _copy_tag(checkpoints[1], tmp_path)
    (tag_dir.parent / "latest").write_text(latest)
    assert checkpoint_check.find_checkpoint("auto", tmp_path) == tag_dir  # the tags themselves are scanned
    with pytest.raises(UserError, match="does not name a checkpoint tag"):
        checkpoint_check.find_checkpoint(str(tag_dir.parent), tmp_path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_base_model_pt_carrying_code_is_one_line_in_every_command(
    tmp_path, capsys, dist_env, gpt2_tokenizer_dir, payload
):
    """``--base_model`` / ``--model`` of train, eval and export: load_model's weights_only load."""
    from ds_sft.cli import main

    from .conftest import loading_commands, write_tiny_data_dir

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "base.pt"
    torch.save({"model": _tiny_state(), "config": PAYLOADS[payload](marker)}, evil)
    data = write_tiny_data_dir(tmp_path / "data", tokenizer=gpt2_tokenizer_dir)
    for name, argv in loading_commands(evil, gpt2_tokenizer_dir, data, tmp_path).items():
        assert main(argv) == 2, name
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and str(evil) in lines[0] and "weights_only" in lines[0], (name, lines)
        assert not marker.exists(), f"{payload} ran in {name}"
