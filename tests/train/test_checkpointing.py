"""Consolidated fp32 weights under bf16, checkpoint discovery and pruning."""

from __future__ import annotations

import json

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.train.checkpointing import STATE_FILE, consolidated_state_dict, find_checkpoint, prune
from ds_sft.train.engine import build_engine
from tests.train.helpers import ds_config, settings, tiny_model

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
    """Tags holding only a well-formed trainer state (an empty file manifest)."""
    for step in steps:
        state = {
            "step": step,
            "world_size": 1,
            "zero_stage": 2,
            "nan_streak": 0,
            "train_tokens": 0,
            "elapsed_s": 0.0,
            "val_history": [],
            "sampler": {"epoch": 0, "consumed_samples": 0, "seed": 0},
            "files": {},
        }
        (ckpt_dir / f"step_{step:06d}").mkdir(parents=True)
        (ckpt_dir / f"step_{step:06d}" / STATE_FILE).write_text(json.dumps(state))
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
