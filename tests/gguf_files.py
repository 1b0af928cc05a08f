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
