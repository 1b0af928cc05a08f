"""Parameter-group membership and the learning-rate schedule, against hand-written expectations."""

from __future__ import annotations

import math

import pytest

from ds_sft.train.engine import format_group_table, lr_at, parameter_groups
from tests.train.helpers import tiny_model


def test_weight_decay_only_on_projection_weights():
    model = tiny_model()
    groups, table = parameter_groups(model, weight_decay=0.05)
    names = {row["group"]: set(row["names"]) for row in table}
    expected_decay = {
        f"layers.{i}.{part}.weight"
        for i in range(2)
        for part in (
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert names["decay"] == expected_decay
    assert names["no_decay"] == {"wte.weight", "norm.weight"} | {
        f"layers.{i}.{norm}.weight" for i in range(2) for norm in ("attn_norm", "mlp_norm")
    }
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    # every parameter exactly once (the tied lm_head is wte), no buffers such as rope_cache
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert sum(row["parameters"] for row in table) == model.config.num_parameters()
    assert "rope_cache" not in format_group_table(table)


def test_untied_lm_head_is_not_decayed():
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    model = LlamaModel(ModelConfig.preset("tiny", tie_embeddings=False))
    _, table = parameter_groups(model, weight_decay=0.1)
    no_decay = next(row for row in table if row["group"] == "no_decay")
    assert "lm_head.weight" in no_decay["names"]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 7e-5 / 10),  # warmup starts at peak / warmup_iters
        (4, 7e-5 * 5 / 10),
        (9, 7e-5),  # the last warmup step reaches the peak
        (10, 7e-5),  # cosine starts at the peak
        (10 + 89 // 2, 1e-5 + 0.5 * (1 + math.cos(math.pi * (89 // 2) / 89)) * 6e-5),
        (99, 1e-5),  # the last step lands on min_lr
    ],
)
def test_lr_schedule_seed_recipe(step, expected):
    assert lr_at(step, peak=7e-5, min_lr=1e-5, warmup_iters=10, max_iters=100) == pytest.approx(
        expected, rel=1e-12
    )


def test_lr_schedule_is_monotone_after_warmup_and_handles_no_warmup():
    lrs = [lr_at(s, 1e-3, 1e-4, 0, 20) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
