"""Parameter-group membership (which weights AdamW decays), against hand-written expectations."""

from __future__ import annotations

from ds_sft.train.param_groups import format_group_table, parameter_groups
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


def test_biases_and_q_k_norms_are_not_decayed():
    """Qwen2's q/k/v biases and Qwen3's q_norm/k_norm gains join the norms in the no-decay group."""
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    for family, switch, parts in (
        ("qwen2", "attention_bias", ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias")),
        ("qwen3", "qk_norm", ("attn.q_norm.weight", "attn.k_norm.weight")),
    ):
        model = LlamaModel(ModelConfig.preset("tiny", family=family, **{switch: True}))
        groups, table = parameter_groups(model, weight_decay=0.1)
        names = {row["group"]: set(row["names"]) for row in table}
        added = {f"layers.{i}.{part}" for i in range(2) for part in parts}
        assert added <= names["no_decay"] and not added & names["decay"], family
        assert len(names["decay"]) == 14  # the projection weights, as without the switch
        assert sum(row["parameters"] for row in table) == model.config.num_parameters()
        no_decay_line = format_group_table(table).splitlines()[2]
        assert all(".".join(p for p in n.split(".") if not p.isdigit()) in no_decay_line for n in added)
