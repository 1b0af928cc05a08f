"""Each supported family's transformers config <-> ds-sft's :class:`ModelConfig`.

:func:`hf_config` writes the config of the family's own class (``LlamaForCausalLM``,
``Qwen3ForCausalLM`` ...: :data:`HF_CLASSES`) describing the same network, for ``ds-sft export``;
:func:`config_from_hf` reads one back, refusing in one line what ds-sft's model cannot compute
(another family, RoPE scaling other than Llama 3's, MLP biases, an activation other than SwiGLU's
silu: :func:`check_activation`).
"""

from __future__ import annotations

from typing import Any

from ds_sft.errors import UserError, first_line
from ds_sft.model.config import FAMILIES, ModelConfig

# transformers' names of the activation in ds-sft's SwiGLU MLP (ACT2FN maps both to SiLU).
SWIGLU_ACTIVATIONS = ("silu", "swish")


# Each family's transformers config and model class.
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
}


def hf_config(config: ModelConfig, **token_ids: Any):
    """The transformers config of the model's family describing the same network (``LlamaConfig``,
    ``Qwen3Config`` ...; ``bos_token_id=...`` etc. passed on)."""
    import transformers

    config_class, model_class = HF_CLASSES[config.family]
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rope_parameters=rope,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        hidden_act=SWIGLU_ACTIVATIONS[0],
        architectures=[model_class],
        **token_ids,
    )
    window = config.sliding_window
    layer_types = [
        ("full_attention", "sliding_attention")[config.layer_window(i) is not None]
        for i in range(config.n_layers)
    ]
    if config.family in ("llama", "qwen3", "smollm3"):
        fields.update(attention_bias=False, mlp_bias=False)
    if config.family == "mistral":
        fields.update(sliding_window=window)
    elif config.family in ("qwen2", "qwen3", "smollm3"):
        fields.update(use_sliding_window=window is not None, sliding_window=window, layer_types=layer_types)
    if config.family == "smollm3":
        fields.update(no_rope_layers=[int(config.layer_uses_rope(i)) for i in range(config.n_layers)])
    if config.family in ("qwen2", "qwen3"):
        fields.update(max_window_layers=config.n_layers)  # layer_types decides; this only documents
    return getattr(transformers, config_class)(**fields)


def check_activation(activation: Any, where: str) -> None:
    """Every family's transformers class computes its MLP with the config's ``hidden_act``: a config
    naming GELU loaded as SwiGLU-silu gave logits 0.01 (gelu) to 0.1 (relu) away from transformers'."""
    if activation not in SWIGLU_ACTIVATIONS:
        raise UserError(
            f"{where}hidden_act {activation!r}: ds-sft's MLP computes SwiGLU with silu only, so it cannot "
            "reproduce this model"
        )


def config_from_hf(hf_cfg, where: str = "") -> ModelConfig:
    """The :class:`ModelConfig` of a transformers config of a supported family (one line if not)."""
    family = hf_cfg.model_type
    if family not in FAMILIES:
        raise UserError(
            f"{where}model_type {family!r} is not supported; ds-sft reads {', '.join(FAMILIES)} models"
        )
    # transformers 5 keeps theta and scaling in rope_parameters (from a 4.x-era config.json too);
    # rope_theta / rope_scaling are read where a config object of another make carries them
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(
            f"{where}RoPE scaling {rope_type!r} is not supported (ds-sft knows plain RoPE and 'llama3')"
        )
    if getattr(hf_cfg, "mlp_bias", False) or (family != "qwen2" and getattr(hf_cfg, "attention_bias", False)):
        raise UserError(
            f"{where}the model has MLP or output-projection biases; ds-sft supports q/k/v biases only"
        )
    check_activation(getattr(hf_cfg, "hidden_act", SWIGLU_ACTIVATIONS[0]), where)
    window = getattr(hf_cfg, "sliding_window", None)
    if family in ("qwen2", "qwen3", "smollm3") and not getattr(hf_cfg, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf_cfg, "layer_types", None) if family != "mistral" else None
    try:
        return ModelConfig(
            vocab_size=hf_cfg.vocab_size,
            d_model=hf_cfg.hidden_size,
            n_layers=hf_cfg.num_hidden_layers,
            n_heads=hf_cfg.num_attention_heads,
            n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
            head_dim=getattr(hf_cfg, "head_dim", None) or None,
            ffn_hidden=hf_cfg.intermediate_size,
            max_seq_len=hf_cfg.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))),
            norm_eps=hf_cfg.rms_norm_eps,
            tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            init_std=hf_cfg.initializer_range,
            family=family,
            attention_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
            sliding_window=window,
            layer_types=list(layer_types) if window is not None and layer_types is not None else None,
            no_rope_layers=list(hf_cfg.no_rope_layers) if family == "smollm3" else None,
        )
    except UserError as err:
        raise UserError(f"{where}{err}") from None
    except (TypeError, ValueError, AttributeError) as err:  # fields of the wrong type in config.json
        raise UserError(f"{where}config.json is not a valid {family} config ({first_line(err)})") from None
