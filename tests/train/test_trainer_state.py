"""trainer_state.json's fields are defined once (``trainer_state.FIELDS``): a fresh run starts from
them, a save writes exactly them (plus ``files``), and a resume checks each one it reads back."""

from __future__ import annotations

import json

import pytest
import torch

from ds_sft.data.sampler import ResumableSampler
from ds_sft.run_layout import TRAINER_STATE
from ds_sft.train.loop import train
from ds_sft.train.trainer_state import (
    AT_SAVE,
    FIELDS,
    FILES,
    fresh_state,
    snapshot,
    trainer_state_problem,
)
from tests.train.helpers import TinyPacked, ds_config, settings, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

AT_SAVE_FIELDS = {name for name, field in FIELDS.items() if field.start is AT_SAVE}


@pytest.fixture(scope="module")
def saved(dist_env, tmp_path_factory) -> tuple[dict, dict]:
    """(trainer_state.json, the client state's copy) of the last tag of a short run."""
    run_dir = tmp_path_factory.mktemp("run")
    s = settings(zero_stage=0, precision="fp32", max_iters=2, eval_interval=2, save_interval=1)
    dataset = TinyPacked(16, seed=3)
    summary = train(s, ds_config(s), tiny_model(), dataset, TinyPacked(8, seed=99), run_dir,
                    ResumableSampler(len(dataset), seed=s.seed), None)  # fmt: skip
    summary["engine"].destroy()
    tag_dir = run_dir / "checkpoints" / "step_000002"
    on_disk = json.loads((tag_dir / TRAINER_STATE).read_text())
    client = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["trainer"]
    return on_disk, client


def test_a_save_writes_exactly_the_defined_fields_and_each_passes_its_check(saved):
    on_disk, client = saved
    assert set(on_disk) == set(FIELDS) | {FILES}
    assert set(client) == set(FIELDS) and {k: v for k, v in on_disk.items() if k != FILES} == client
    assert trainer_state_problem(on_disk, with_files=True) is None
    assert on_disk["step"] == 2 and on_disk["world_size"] == 1 and on_disk["max_iters"] == 2


def test_a_fresh_state_holds_every_progress_field_at_its_start_and_owns_its_lists():
    first, second = fresh_state(), fresh_state()
    assert set(first) == set(FIELDS) - AT_SAVE_FIELDS
    assert first == {name: FIELDS[name].start for name in first}
    first["val_history"].append(1.0)
    first["changes"].append({})
    assert second["val_history"] == [] and second["changes"] == [] and fresh_state() == second


def test_a_snapshot_needs_every_field_read_at_the_save():
    values = dict.fromkeys(AT_SAVE_FIELDS, 0)
    assert set(snapshot(fresh_state(), **values)) == set(FIELDS)
    for missing in sorted(AT_SAVE_FIELDS):
        with pytest.raises(KeyError, match=missing):
            snapshot(fresh_state(), **{k: v for k, v in values.items() if k != missing})


CHECKED = [name for name, field in FIELDS.items() if name not in ("changes", "optimizer")]
# absent from older states, or None until set: a state without them is no less genuine
OPTIONAL = {"best_val", "best_tag", "max_iters", "val_sample", "run"}


@pytest.mark.parametrize("name", CHECKED)
def test_every_checked_field_refuses_what_no_save_writes_and_names_it(saved, name):
    state = {k: v for k, v in saved[0].items() if k != FILES}
    for value in ("7", True, None if name not in OPTIONAL else "x"):  # no field holds a bool or a "7"
        problem = trainer_state_problem({**state, name: value})
        assert problem is not None and name in problem.removeprefix("bad or missing ").split(", "), problem
    absent = trainer_state_problem({k: v for k, v in state.items() if k != name})
    assert (absent is None) == (name in OPTIONAL), absent
