"""The shape of a LLaMA-style decoder, as one JSON-serialisable dataclass.

Presets (parameter counts are exact; see ``ModelConfig.num_parameters``):

- ``112m``: the fp8-pretrained base of this project's seed. d_model 768, 12 layers, 12 heads of 64,
  SwiGLU hidden 1632, GPT-2 vocabulary padded to 50,304 (a multiple of 128, for the tensor cores),
  tied embeddings: 38,633,472 embedding + 12 x 6,120,960 per block + 768 final norm
  = **112,085,760** parameters. (The usual 8/3 x d = 2048 hidden would give 123.6M.)
- ``smollm2-135m``: HuggingFaceTB/SmolLM2-135M: 30 layers, d_model 576, 9 query / 3 key-value heads
  (grouped-query attention), SwiGLU hidden 1536, vocabulary 49,152, tied, RoPE theta 100,000,
  RMSNorm eps 1e-5: **134,515,008** parameters.
- ``tiny``: 2 layers of d_model 64 with GQA (4 / 2 heads), SwiGLU 160, a 256-token vocabulary, for
  tests: **102,720** parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_sft.errors import UserError

# kernels.BACKENDS, repeated here so that reading a config does not import torch
KERNEL_BACKENDS = ("auto", "triton", "torch", "eager")
# Fields that say how a run computes, not what the model is: set for a run, never saved with the
# weights (a checkpoint trained with activation checkpointing is the same model without it).
RUN_SETTINGS = ("kernels", "activation_checkpointing")


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention); fewer = GQA
    ffn_hidden: int = 1632  # SwiGLU inner width
    max_seq_len: int = 2048  # length of the precomputed RoPE table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares wte's weight
    init_std: float = 0.02
    kernels: str = "auto"  # kernels backend for RMSNorm and the loss: auto | triton | torch | eager
    activation_checkpointing: bool = False  # recompute each block in backward to save activations

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise UserError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.kernels not in KERNEL_BACKENDS:
            raise UserError(f"kernels {self.kernels!r}: choose one of {', '.join(KERNEL_BACKENDS)}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding once."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # q, o and k, v
        block = attention + 3 * d * self.ffn_hidden + 2 * d  # + SwiGLU + two norms
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * block + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that describe the model (what :meth:`save` writes): all but :data:`RUN_SETTINGS`."""
        return {key: value for key, value in self.to_dict().items() if key not in RUN_SETTINGS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.architecture(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "112m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, ffn_hidden=1632),
    "smollm2-135m": dict(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_hidden=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        init_std=0.041666666666666664,
    ),
    "tiny": dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, max_seq_len=128
    ),
}
