"""Parameter names between layouts: any LLaMA trainer's -> ds-sft's, and ds-sft's -> Hugging Face's.

:func:`canonical_state_dict` accepts the key names of the common LLaMA codebases (prefixes and
renames are listed in :data:`PREFIXES` and :data:`RENAMES`); :func:`to_hf_state_dict` gives
transformers' names (:data:`HF_RENAMES`), which ``ds-sft export`` writes:

    ds-sft / this project     wte  layers.N.attn.{q,k,v,o}_proj  layers.N.mlp.{gate,up,down}_proj
                              layers.N.{attn_norm,mlp_norm}  norm  lm_head
    Hugging Face              model.embed_tokens  model.layers.N.self_attn.*  input_layernorm
                              post_attention_layernorm  model.norm
    Meta / torchtune style    tok_embeddings  layers.N.attention.{wq,wk,wv,wo}
                              feed_forward.{w1 (gate), w3 (up), w2 (down)}  attention_norm  ffn_norm  output
    nanoGPT style             transformer.h.N.  ln_1  ln_2  ln_f  attn.c_attn (fused qkv)  attn.c_proj
    wrappers                  _orig_mod. (torch.compile)  module. (DDP / DeepSpeed)
    fused layouts             attn.{qkv,c_attn,wqkv} rows [q; k; v]; mlp.{gate_up_proj,w12,fc1} [gate; up]

Transformer Engine ``*._extra_state`` entries (fp8 scaling metadata) are set aside, and so are buffers
recomputed from the config (``rope_cache``, nanoGPT's causal ``attn.bias``, ``inv_freq`` ...). A fused
qkv is split once the head layout is known (:func:`split_fused_qkv`), and Q/K rows of Meta's
interleaved RoPE layout are reordered into the half layout (:func:`interleaved_to_half_rope`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from ds_sft.errors import UserError, preview
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel

log = logging.getLogger(__name__)


PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "model.", "transformer.")


# (pattern, replacement), applied in order to each prefix-stripped key.
RENAMES: list[tuple[str, str]] = [
    (r"^(?:embed_tokens|tok_embeddings|token_embedding|embedding)\.", "wte."),
    (r"^(?:h|blocks|layer)\.(\d+)\.", r"layers.\1."),
    (r"\.(?:self_attn|attention)\.", ".attn."),
    (r"\.(?:feed_forward|ffn)\.", ".mlp."),
    (r"\.(?:input_layernorm|attention_norm|ln_1)\.", ".attn_norm."),
    (r"\.(?:post_attention_layernorm|ffn_norm|ln_2)\.", ".mlp_norm."),
    (r"\.attn\.(?:wq|q)\.", ".attn.q_proj."),
    (r"\.attn\.(?:wk|k)\.", ".attn.k_proj."),
    (r"\.attn\.(?:wv|v)\.", ".attn.v_proj."),
    (r"\.attn\.(?:wo|c_proj|out_proj)\.", ".attn.o_proj."),
    (r"\.attn\.(?:c_attn|qkv|wqkv|Wqkv)\.", ".attn.qkv_proj."),
    (r"\.mlp\.w1\.", ".mlp.gate_proj."),
    (r"\.mlp\.w3\.", ".mlp.up_proj."),
    (r"\.mlp\.(?:w2|c_proj)\.", ".mlp.down_proj."),
    (r"\.mlp\.(?:w12|fc1)\.", ".mlp.gate_up_proj."),
    (r"^(?:ln_f|norm_f|final_norm|final_layernorm)\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"norm\.scale$", "norm.weight"),
]


# Buffers that the model recomputes from its config.
RECOMPUTED_BUFFERS = re.compile(
    r"(?:^|\.)(?:rope_cache|freqs_cis|inv_freq|cos_cached|sin_cached|attn\.bias|masked_bias)$"
)


def canonical_key(key: str) -> str:
    """The ds-sft name of a parameter from any of the supported layouts."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def canonical_state_dict(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Rename keys, split fused gate-up weights, set aside fp8 extra state and recomputed buffers.

    Returns (weights, TE extra state by module name, buffers the model recomputes).
    """
    out: dict[str, torch.Tensor] = {}
    extra_state: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    sources: dict[str, str] = {}  # canonical name -> the entry it came from
    for raw_key, value in state.items():
        key = canonical_key(str(raw_key))
        if key.endswith("_extra_state"):
            extra_state[key.rsplit(".", 1)[0]] = value
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"its entry {raw_key!r} is a {type(value).__name__}, not a tensor")
        if RECOMPUTED_BUFFERS.search(key):
            buffers[key] = value
            continue
        problem = _unreadable_weight(value)
        if problem:
            raise UserError(f"its entry {raw_key!r} is {problem}")
        if key.endswith("mlp.gate_up_proj.weight"):
            gate, up = value.chunk(2, dim=0)
            _put(out, sources, key.replace("gate_up_proj", "gate_proj"), gate, str(raw_key))
            _put(out, sources, key.replace("gate_up_proj", "up_proj"), up, str(raw_key))
        else:
            _put(out, sources, key, value, str(raw_key))
    if buffers:
        log.info("ignored %d buffers recomputed from the config: %s", len(buffers), preview(sorted(buffers)))
    if extra_state:
        log.info("kept Transformer Engine _extra_state of %d modules for the fp8 path", len(extra_state))
    return out, extra_state, buffers


# The dtypes a weight is read in (and cast from to the dtype asked for).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unreadable_weight(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be a weight as it is, or None. Sparse and meta tensors, and fp8 ones (which
    need scales ds-sft does not read), failed deep inside torch with a traceback; integer ones would
    be cast to meaningless floats."""
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one"
    if tensor.is_meta:
        return "a meta tensor, which holds no values: save the model's real weights"
    if tensor.dtype not in WEIGHT_DTYPES:
        kinds = ", ".join(str(dtype).removeprefix("torch.") for dtype in WEIGHT_DTYPES)
        return f"of dtype {str(tensor.dtype).removeprefix('torch.')}: ds-sft reads {kinds} weights"
    return None


def _put(state: dict[str, torch.Tensor], sources: dict[str, str], key: str, tensor, source: str) -> None:
    """``state[key] = tensor``, refused when another entry already gave ``key`` a different value:
    a checkpoint holding a weight under two names (``wte`` and ``model.embed_tokens``, a fused qkv
    beside its q) loaded whichever came last, silently."""
    same = key in state and state[key].dtype == tensor.dtype and state[key].shape == tensor.shape
    if key in state and not (same and torch.equal(state[key], tensor)):
        raise UserError(
            f"its entries {sources[key]!r} and {source!r} are two different values of the weight {key}: "
            "keep one of them"
        )
    state[key], sources[key] = tensor, source


def split_fused_qkv(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Split each ``attn.qkv_proj.weight`` (rows ordered q, k, v) into the three projections."""
    kv = config.n_kv_heads * config.head_dim
    rows = [config.n_heads * config.head_dim, kv, kv]
    for key in [k for k in state if k.endswith("attn.qkv_proj.weight")]:
        if state[key].ndim != 2 or state[key].shape[0] != sum(rows):
            raise UserError(f"{key} {tuple(state[key].shape)} is not q, k and v of {rows} rows fused")
        q, k, v = state.pop(key).split(rows, dim=0)
        sources = {name: name for name in state}
        for name, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            _put(state, sources, key.replace("qkv_proj", name), tensor, key)


def interleaved_to_half_rope(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Reorder each head's Q and K rows from (0, 1), (2, 3) ... pairs to (i, i + head_dim/2) pairs.

    New row i is old row 2i and new row head_dim/2 + i old row 2i + 1: the same rotation, with the
    features laid out the way :func:`ds_sft.model.llama.apply_rope` pairs them. Q and K move alike,
    so every q.k product (and the attention) is unchanged.
    """
    kinds = [("q_proj", config.n_heads), ("k_proj", config.n_kv_heads), ("q_norm", 1), ("k_norm", 1)]
    for name, heads in kinds:  # weights, biases, and the per-feature gains of the q/k norms
        for key in [k for k in state if re.search(rf"attn\.{name}\.(?:weight|bias)$", k)]:
            tensor = state[key]
            rows = tensor.reshape(heads, config.head_dim // 2, 2, -1)
            state[key] = rows.transpose(1, 2).reshape(tensor.shape)
    log.info("permuted Q/K rows from the interleaved RoPE layout to the half layout")


HF_RENAMES: list[tuple[str, str]] = [
    (r"^wte\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.norm."),
]


def to_hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (every family's, ``LlamaForCausalLM``'s; tied
    head omitted)."""
    out = {}
    for key, tensor in model.state_dict().items():
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out
