"""Small GGUF files written with the ``gguf`` package (the reader transformers uses), a few KB each.

:func:`write_gguf` makes a llama GGUF holding what a test asks for: a small BPE tokenizer with the
special-token ids it names, tensors, or neither (a file that is only a header and its metadata).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefgh", "ab", "abc"]
SPECIAL = 3  # the first three are special (token type 3 = control)


def write_gguf(
    path: Path, special_ids: dict[str, int] | None = None, tensors: dict[str, np.ndarray] | None = None
) -> Path:
    """A llama GGUF at ``path``. ``special_ids`` (e.g. ``{"bos": 1, "eos": 2, "pad": 2}``) adds the
    tokenizer with those ids; ``tensors`` adds those arrays by name."""
    gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install -e '.[gguf]')")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    if special_ids is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(TOKENS)
        writer.add_token_types([3] * SPECIAL + [1] * (len(TOKENS) - SPECIAL))
        writer.add_token_merges(["a b", "ab c"])
        for role, token_id in special_ids.items():
            getattr(writer, f"add_{role}_token_id")(token_id)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ds-sft's weight names -> llama.cpp's (``blk.N.`` + these for the layers' own)
GGUF_NAMES = {"wte": "token_embd", "norm": "output_norm", "lm_head": "output"}
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name of a ds-sft weight (``layers.0.attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"blk.{index}.{GGUF_LAYER_NAMES[rest]}.weight"
    return f"{GGUF_NAMES[module]}.weight"


def write_model_gguf(path: Path, config, state: dict, metadata: dict | None = None) -> Path:
    """A llama GGUF of a whole ds-sft model (``config`` + its fp32 ``state``), which ``load_model`` reads.

    ``metadata``: keys to add or replace, each ``(value, gguf.GGUFValueType)`` (``None``: leave it out)."""
    gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package (pip install -e '.[gguf]')")
    kind = gguf.GGUFValueType
    keys = {
        "llama.context_length": (config.max_seq_len, kind.UINT32),
        "llama.embedding_length": (config.d_model, kind.UINT32),
        "llama.block_count": (config.n_layers, kind.UINT32),
        "llama.feed_forward_length": (config.ffn_hidden, kind.UINT32),
        "llama.attention.head_count": (config.n_heads, kind.UINT32),
        "llama.attention.head_count_kv": (config.n_kv_heads, kind.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (config.norm_eps, kind.FLOAT32),
        "llama.vocab_size": (config.vocab_size, kind.UINT32),
        "llama.rope.freq_base": (config.rope_theta, kind.FLOAT32),
        **(metadata or {}),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, value_type) in keys.items():
        if value is not None:
            sub_type = None
            if value_type == kind.ARRAY:
                sub_type = kind.STRING if isinstance(value[0], str) else kind.INT32
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for name, tensor in state.items():
        writer.add_tensor(gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
