"""A checkpoint's :class:`ModelConfig`, from whatever it says of itself and from its tensor shapes.

Trainers name their config fields differently (:data:`CONFIG_ALIASES`); :func:`carried_config` reads a
config carried beside or inside a checkpoint (one naming a transformers ``model_type`` as
transformers reads it), and :func:`infer_config` corrects it by the shapes of the weights, which
decide the sizes; the fields decide what shapes cannot tell (heads, RoPE theta, eps).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ds_sft.errors import UserError, first_line, preview
from ds_sft.model.config import PRESETS, RUN_SETTINGS, ModelConfig, check_field
from ds_sft.model.hf_families import SWIGLU_ACTIVATIONS, check_activation, config_from_hf
from ds_sft.model.param_names import split_fused_qkv
from ds_sft.positions import POSITION_FIELDS

log = logging.getLogger(__name__)


# Names that other trainers give to the fields of ModelConfig (model_args, config.json, ...).
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
    "d_model": ("d_model", "n_embd", "dim", "hidden_size"),
    "n_layers": ("n_layers", "n_layer", "num_hidden_layers"),
    "n_heads": ("n_heads", "n_head", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "n_kv_head", "num_key_value_heads", "n_query_groups"),
    "head_dim": ("head_dim", "head_size"),
    "ffn_hidden": ("ffn_hidden", "intermediate_size", "hidden_dim", "ffn_dim", "mlp_hidden"),
    "max_seq_len": POSITION_FIELDS,
    "rope_theta": ("rope_theta", "rope_base", "theta"),
    "norm_eps": ("norm_eps", "rms_norm_eps", "layer_norm_eps"),
    "tie_embeddings": ("tie_embeddings", "tie_word_embeddings", "tie_weights"),
}


def carried_config(values: dict[str, Any], source: Path) -> dict[str, Any]:
    """The config fields a checkpoint carries (a config file beside its weights, a torch file's
    ``config``), for :func:`infer_config`. One naming a transformers ``model_type`` is read as
    transformers reads it (``rope_parameters``, ``hidden_act`` ...) and refused unless its family is
    one ds-sft computes: a Gemma's or Granite's weights have LLaMA's names and shapes, and loaded as
    a LLaMA they gave other logits (1.5 and 0.5 away) with exit 0."""
    if "model_type" not in values:
        check_activation(values.get("hidden_act", SWIGLU_ACTIVATIONS[0]), f"{source}: ")
        return values
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.for_model(**values)
    except Exception as err:  # noqa: BLE001  transformers' validators raise anything
        raise UserError(f"{source}: not a valid config ({first_line(err)})") from None
    return config_from_hf(hf_cfg, where=f"{source}: ").architecture()


def infer_config(
    state: dict[str, torch.Tensor], hints: dict[str, Any], tie_hint: bool | None, overrides: dict[str, Any]
) -> ModelConfig:
    """Config from the checkpoint's own fields, corrected by the tensor shapes, then ``overrides``.

    Shapes decide the sizes; the fields decide what shapes cannot tell (heads, RoPE theta, eps).
    Splits fused qkv weights in ``state`` once the head layout is known.
    """
    known = ModelConfig.__dataclass_fields__
    # How a run computes (RUN_SETTINGS) is the command's choice, never the file's: a hand-written
    # "kernels": "triton" made eval and export launch Triton on a CPU.
    fields = {
        name: value
        for name, value in hints.items()
        if name in known and name not in RUN_SETTINGS and value is not None
    }
    for name, aliases in CONFIG_ALIASES.items():
        found = [hints[alias] for alias in aliases if hints.get(alias) is not None]
        if name not in fields and found:
            fields[name] = found[0]
    if "wte.weight" not in state:
        raise UserError(
            f"no token embedding among the checkpoint's keys ({preview(sorted(state))}); see "
            "ds_sft.model.param_names for the key names it accepts"
        )
    if state["wte.weight"].ndim != 2:
        raise UserError(
            f"its token embedding has shape {tuple(state['wte.weight'].shape)}, not (vocab_size, d_model)"
        )
    fields["vocab_size"], fields["d_model"] = state["wte.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    fields["n_layers"] = max(layers) + 1 if layers else 0
    if "layers.0.mlp.gate_proj.weight" in state:
        fields["ffn_hidden"] = state["layers.0.mlp.gate_proj.weight"].shape[0]
    fields["tie_embeddings"] = "lm_head.weight" not in state if tie_hint is None else tie_hint
    # the family switches that weights reveal (a bare state dict says nothing else)
    fields.setdefault("attention_bias", "layers.0.attn.q_proj.bias" in state)
    fields.setdefault("qk_norm", "layers.0.attn.q_norm.weight" in state)
    if "family" not in fields:
        fields["family"] = "qwen3" if fields["qk_norm"] else "qwen2" if fields["attention_bias"] else "llama"
    fields.update(overrides)
    for name, value in fields.items():  # before the sizes below are computed from them
        check_field(name, value)
    if "n_heads" not in fields:
        fields["n_heads"] = _guess_heads(fields)
    if "head_dim" not in fields:
        fields["head_dim"] = _head_dim_from_weights(state, fields)
    head_dim = fields.get("head_dim") or fields["d_model"] // fields["n_heads"]
    k_proj = state.get("layers.0.attn.k_proj.weight")
    if "n_kv_heads" not in fields and k_proj is not None and k_proj.ndim == 2 and head_dim:
        fields["n_kv_heads"] = k_proj.shape[0] // head_dim
    config = ModelConfig(**fields)
    split_fused_qkv(state, config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # a tied model saved with both names (HF's state_dict)
    return config


def _head_dim_from_weights(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> int | None:
    """The head width that q's rows reveal (q alone, or q, k and v fused when the key/value heads are
    known); None = d_model // n_heads."""
    q, qkv = state.get("layers.0.attn.q_proj.weight"), state.get("layers.0.attn.qkv_proj.weight")
    if q is not None and q.ndim == 2:
        return q.shape[0] // fields["n_heads"] or None
    if qkv is not None and qkv.ndim == 2 and "n_kv_heads" in fields:
        return qkv.shape[0] // (fields["n_heads"] + 2 * fields["n_kv_heads"]) or None
    return None


def _guess_heads(fields: dict[str, Any]) -> int:
    for preset in PRESETS.values():
        if (preset["d_model"], preset["n_layers"]) == (fields["d_model"], fields["n_layers"]):
            return preset["n_heads"]
    log.warning(
        "the checkpoint does not say its number of heads: assuming head_dim 64 "
        "(pass config_overrides={'n_heads': ...} if that is wrong)"
    )
    return max(1, fields["d_model"] // 64)
