"""A LLaMA-style decoder as one JSON-serialisable dataclass: its shape and family switches, saved with
the weights, and two run settings (:data:`RUN_SETTINGS`: the kernels backend, activation
checkpointing), which say how a run computes it and are never saved.

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

Families. The small models people fine-tune differ from LLaMA-2 in a few switches, so each is this
one config with some of them set (``family`` names the transformers class that export writes):

- ``llama``: Llama 2 and 3.x, SmolLM2; Llama 3.1+ sets ``rope_scaling`` (the ``llama3`` rule).
- ``qwen2``: Qwen2 / Qwen2.5: ``attention_bias`` (biases on q, k and v; o has none); sliding
  windows on the layers ``layer_types`` marks, when the checkpoint enables them.
- ``qwen3``: ``qk_norm`` (an RMSNorm over each head's q and k before RoPE), no biases.
- ``mistral``: ``sliding_window`` on every layer (a query sees itself and the window - 1 keys before).
- ``smollm3``: ``no_rope_layers`` (1 = the layer rotates q and k, 0 = it uses no positions at all).

Any family may set ``head_dim`` apart from ``d_model / n_heads`` (Qwen3-0.6B: 16 heads of 128 over
d_model 1024): q and o are then ``n_heads * head_dim`` wide, k and v ``n_kv_heads * head_dim``.

Every switch off (the defaults) is exactly the LLaMA model, at the same speed. Fields added with the
families are saved only when they differ from their defaults, so a LLaMA config reads (and compares on
resume) as it did before them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_sft.errors import UserError
from ds_sft.options import Bool, Domain, Float, Int, checked
from ds_sft.positions import DEFAULT_POSITIONS
from ds_sft.safe_read import read_json_object
from ds_sft.safe_write import write_result_file

# kernels.BACKENDS, repeated here so that reading a config does not import torch
KERNEL_BACKENDS = ("auto", "triton", "torch", "eager")
# Fields that say how a run computes, not what the model is: set for a run, never saved with the
# weights (a checkpoint trained with activation checkpointing is the same model without it).
RUN_SETTINGS = ("kernels", "activation_checkpointing")
# Which transformers class each family is (what export writes and import accepts as model_type).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# The fields that the families added: written only when set (see the module docstring).
FAMILY_FIELDS = (
    "family",
    "attention_bias",
    "qk_norm",
    "rope_scaling",
    "sliding_window",
    "layer_types",
    "no_rope_layers",
)
# Each key's range: Llama 3.x uses 8 and 32, 1 and 4, 8192. Past these bounds the frequencies overflow
# (a 300-digit position count does not fit the float64 the table is computed in).
LLAMA3_ROPE_DOMAINS = {
    "factor": Float(0, 1e6, min_open=True),
    "low_freq_factor": Float(0, 1e6, min_open=True),
    "high_freq_factor": Float(0, 1e6, min_open=True),
    "original_max_position_embeddings": Float(0, 1 << 20, min_open=True),
}
LLAMA3_ROPE_KEYS = tuple(LLAMA3_ROPE_DOMAINS)

# The range of each number in a config: far beyond any model ds-sft trains, near enough that a typo or
# a hostile file cannot make it allocate the machine (the RoPE table alone is max_seq_len x head_dim).
FIELD_DOMAINS: dict[str, Domain] = {
    "vocab_size": Int(1, 1 << 22),
    "d_model": Int(1, 1 << 16),
    "n_layers": Int(1, 1024),
    "n_heads": Int(1, 1024),
    "n_kv_heads": Int(1, 1024),
    "head_dim": Int(2, 1024),
    "ffn_hidden": Int(1, 1 << 18),
    "max_seq_len": Int(1, 1 << 20),
    "sliding_window": Int(1, 1 << 20),
    "rope_theta": Float(0, 1e12, min_open=True),
    "norm_eps": Float(0, 0.5, min_open=True),
    "init_std": Float(0, 1, min_open=True),
    **{name: Bool() for name in ("tie_embeddings", "activation_checkpointing", "attention_bias", "qk_norm")},
}
ROPE_TABLE_LIMIT = 1 << 27  # max_seq_len x head_dim: Qwen2.5-1M's 1M positions x 128


OPTIONAL_NUMBERS = ("n_kv_heads", "head_dim", "sliding_window")  # None = derived, or off


def check_field(name: str, value: Any) -> None:
    """One UserError naming ``name`` unless ``value`` lies in its domain (:data:`FIELD_DOMAINS`)."""
    if name in FIELD_DOMAINS and not (value is None and name in OPTIONAL_NUMBERS):
        checked(name, value, FIELD_DOMAINS[name])


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention); fewer = GQA
    head_dim: int | None = None  # width of each head; None = d_model // n_heads (Qwen3 sets 128)
    ffn_hidden: int = 1632  # SwiGLU inner width
    max_seq_len: int = DEFAULT_POSITIONS  # length of the precomputed RoPE table
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares wte's weight
    init_std: float = 0.02
    kernels: str = "auto"  # kernels backend for RMSNorm and the loss: auto | triton | torch | eager
    activation_checkpointing: bool = False  # recompute each block in backward to save activations
    family: str = "llama"  # the transformers class: llama | qwen2 | qwen3 | mistral | smollm3
    attention_bias: bool = False  # biases on q, k and v (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # Llama 3's "llama3" frequency rule (LLAMA3_ROPE_KEYS)
    sliding_window: int | None = None  # keys a query sees on a sliding layer, itself included
    layer_types: list[str] | None = None  # per layer: LAYER_TYPES; None = all sliding if a window is set
    no_rope_layers: list[int] | None = None  # per layer: 1 = RoPE, 0 = no positions (SmolLM3)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # types and ranges first: everything below computes
            check_field(field.name, getattr(self, field.name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise UserError(
                    f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}: set head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
            check_field("head_dim", self.head_dim)
        if self.max_seq_len * self.head_dim > ROPE_TABLE_LIMIT:
            raise UserError(
                f"max_seq_len {self.max_seq_len} x head_dim {self.head_dim} exceeds {ROPE_TABLE_LIMIT} "
                "RoPE table entries: lower max_seq_len"
            )
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.kernels not in KERNEL_BACKENDS:
            raise UserError(f"kernels {self.kernels!r}: choose one of {', '.join(KERNEL_BACKENDS)}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        self._check_family()

    def _check_family(self) -> None:
        """The family switches are well formed and the family's transformers class can express them."""
        if self.family not in FAMILIES:
            raise UserError(f"family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.rope_scaling is not None:
            self.rope_scaling = _llama3_rope_scaling(self.rope_scaling)
        for name, allowed in (("layer_types", LAYER_TYPES), ("no_rope_layers", (0, 1))):
            values = getattr(self, name)
            if values is None:
                continue
            if (
                not isinstance(values, list)
                or len(values) != self.n_layers
                or any(isinstance(v, bool) or v not in allowed for v in values)
            ):
                raise UserError(
                    f"{name} must list one of {', '.join(map(str, allowed))} for each of the {self.n_layers} "
                    f"layers, got {values!r}"
                )
        if (
            self.layer_types is not None
            and "sliding_attention" in self.layer_types
            and self.sliding_window is None
        ):
            raise UserError("layer_types has sliding_attention layers but sliding_window is not set")
        rules = FAMILY_RULES[self.family]
        for name in ("attention_bias", "qk_norm"):
            if getattr(self, name) != rules[name]:
                needs = [f for f in FAMILIES if FAMILY_RULES[f][name] == getattr(self, name)]
                raise UserError(
                    f"{name}={getattr(self, name)} is not the {self.family} family's ({rules[name]}): "
                    f"set family to {' or '.join(needs)}, or {name} to {rules[name]}"
                )
        windows = {self.layer_window(i) for i in range(self.n_layers)}
        if self.sliding_window is not None and rules["windows"] == "none":
            raise UserError(
                f"the {self.family} family has no sliding windows: drop sliding_window or set family to "
                "mistral, qwen2, qwen3 or smollm3"
            )
        if len(windows) > 1 and rules["windows"] != "per_layer":
            raise UserError(
                f"the {self.family} family slides on every layer or none: drop layer_types or set family "
                "to qwen2, qwen3 or smollm3"
            )
        if self.no_rope_layers is not None and self.family != "smollm3":
            raise UserError("no_rope_layers is SmolLM3's: set family to smollm3 or drop no_rope_layers")

    def layer_window(self, layer: int) -> int | None:
        """How many keys (itself included) a query of ``layer`` sees; None = every earlier key."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_uses_rope(self, layer: int) -> bool:
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    @property
    def derived_head_dim(self) -> int | None:
        """``d_model // n_heads`` where it divides: the head width when ``head_dim`` is not given."""
        return None if self.d_model % self.n_heads else self.d_model // self.n_heads

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding once."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = (q + 2 * kv) * self.attention_bias + 2 * self.head_dim * self.qk_norm
        block = attention + 2 * d  # + two norms
        input_embedding = 0 if self.tie_embeddings else self.vocab_size * d  # a tied one is the head
        return self.matmul_parameters() + input_embedding + self.n_layers * block + d

    def matmul_parameters(self) -> int:
        """The weights every token is multiplied by: the projections and the LM head, the ``N`` of
        the ``6 N`` FLOPs a trained token costs. An untied input embedding is a table lookup, and norm
        gains and biases are elementwise: counting them overstates MFU (untied, the 112m shape would
        count 150.7M weights for 112.1M, a third too many)."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        block = d * q * 2 + d * kv * 2 + 3 * d * self.ffn_hidden  # q, o, k, v and SwiGLU's three
        return self.n_layers * block + self.vocab_size * d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that describe the model (what :meth:`save` writes): all but :data:`RUN_SETTINGS`,
        the :data:`FAMILY_FIELDS` only where they differ from their defaults, and ``head_dim`` only
        where it is not ``d_model // n_heads``."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        defaults["head_dim"] = self.derived_head_dim
        optional = (*FAMILY_FIELDS, "head_dim")
        return {
            key: value
            for key, value in self.to_dict().items()
            if key not in RUN_SETTINGS and not (key in optional and value == defaults[key])
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        write_result_file(path, json.dumps(self.architecture(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        values = read_json_object(Path(path), "model config")
        try:
            return cls.from_dict(values)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(
                f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} (a model to start from, "
                "a folder or a weights file, goes to --base_model)"
            )
        return cls.from_dict({**PRESETS[name], **overrides})


# What each family's transformers class can express: its fixed switches and where it slides.
FAMILY_RULES: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=False, qk_norm=False, windows="none"),
    "qwen2": dict(attention_bias=True, qk_norm=False, windows="per_layer"),
    "qwen3": dict(attention_bias=False, qk_norm=True, windows="per_layer"),
    "mistral": dict(attention_bias=False, qk_norm=False, windows="all_layers"),
    "smollm3": dict(attention_bias=False, qk_norm=False, windows="per_layer"),
}


def _llama3_rope_scaling(values: Any) -> dict[str, Any]:
    """``rope_scaling`` checked and normalised: ``{"rope_type": "llama3", factor, ... }``."""
    if not isinstance(values, dict):
        raise UserError(f"rope_scaling must be a mapping, got {values!r}")
    kind = values.get("rope_type", values.get("type"))
    if kind != "llama3":
        raise UserError(
            f"rope_scaling type {kind!r} is not supported: ds-sft knows Llama 3's 'llama3' rule only"
        )
    for key in LLAMA3_ROPE_KEYS:
        checked(f"rope_scaling.{key}", values.get(key), LLAMA3_ROPE_DOMAINS[key])
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise UserError(f"rope_scaling: high_freq_factor must exceed low_freq_factor, got {values!r}")
    scaling = {"rope_type": "llama3", **{k: values[k] for k in LLAMA3_ROPE_KEYS}}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return scaling


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
