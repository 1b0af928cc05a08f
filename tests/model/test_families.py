"""Every family against transformers' own class: random-init tiny configs, no download.

For each family (Llama 3 with ``llama3`` RoPE scaling, tied and untied; Qwen2 with biases, with and
without sliding windows; Qwen3's q/k norms; Mistral's sliding window shorter than the sequence;
SmolLM3's no-RoPE layers) a transformers model with every parameter randomised (biases and norm gains
too, which transformers initialises to 0 and 1) is saved and imported through ``load_model``; then

- fp32 logits agree with transformers' forward within 1e-4,
- a packed row of documents computes each document as if it were alone,
- KV-cache greedy generation gives transformers' ``generate(do_sample=False)`` tokens,
- ``export_hf`` writes the family's own class, and ``AutoModelForCausalLM`` loads the same logits.

The Hypothesis tests cover classes of inputs: sliding windows against document lengths (packing
isolation) and per-layer patterns of sliding and no-RoPE layers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.errors import UserError
from ds_sft.model.checkpoint import load_model
from ds_sft.model.config import ModelConfig
from ds_sft.model.export import export_hf
from ds_sft.model.generate import generate
from ds_sft.model.hf_families import config_from_hf, hf_config
from ds_sft.model.llama import LlamaModel

VOCAB, SEQ = 256, 40
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # at head_dim 16 the wavelengths (6.3 ... 19,869 positions) fall in all three bands
    original_max_position_embeddings=64,
)

# family id -> (transformers config class, its arguments beyond the common tiny shape)
FAMILIES = {
    "llama3-tied": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama3-untied": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-sliding": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=7, max_window_layers=1, tie_word_embeddings=False),
    ),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    # heads wider (Qwen3-0.6B: 16 x 128 over d_model 1024) and narrower than d_model / n_heads
    "qwen3-wide-heads": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "llama-narrow-heads": ("LlamaConfig", dict(head_dim=8, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=6, tie_word_embeddings=False)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0, 1], tie_word_embeddings=True)),
    "smollm3-sliding": (
        "SmolLM3Config",
        dict(no_rope_layers=[0, 1, 0], use_sliding_window=True, sliding_window=5, tie_word_embeddings=True),
    ),
}
# what each must import as: a field of ModelConfig that the family switches on
EXPECTED = {
    "llama3-tied": dict(family="llama", rope_scaling={**LLAMA3, "rope_theta": None}),
    "llama3-untied": dict(family="llama", tie_embeddings=False),
    "qwen2": dict(family="qwen2", attention_bias=True, sliding_window=None),
    "qwen2-sliding": dict(
        family="qwen2", sliding_window=7, layer_types=["full_attention"] + ["sliding_attention"] * 2
    ),
    "qwen3": dict(family="qwen3", qk_norm=True, attention_bias=False, head_dim=16),
    "qwen3-wide-heads": dict(family="qwen3", d_model=64, n_heads=4, head_dim=32),
    "llama-narrow-heads": dict(family="llama", d_model=64, n_heads=4, head_dim=8),
    "mistral": dict(family="mistral", sliding_window=6, layer_types=None),
    "smollm3": dict(family="smollm3", no_rope_layers=[1, 0, 1], sliding_window=None),
    "smollm3-sliding": dict(
        family="smollm3",
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def hf_tiny_config(family: str):
    import transformers

    config_class, extra = FAMILIES[family]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=None,  # generation runs to max_new_tokens in both implementations
        pad_token_id=0,
    )
    return getattr(transformers, config_class)(**{**common, **extra})


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: biases away from 0, norm gains away from 1, so each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.08 * noise)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family id, transformers model, ds-sft model imported from its saved folder); the folder is
    ``ours.source``."""
    from transformers import AutoModelForCausalLM

    family = request.param
    seed = list(FAMILIES).index(family)
    hf = randomized(AutoModelForCausalLM.from_config(hf_tiny_config(family), dtype=torch.float32), seed)
    folder = tmp_path_factory.mktemp(family)
    hf.save_pretrained(folder)
    ours = load_model(folder).eval()
    ours.source = folder
    return family, hf, ours


def random_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_import_sets_the_family_switches(pair):
    family, hf, ours = pair
    for field, value in EXPECTED[family].items():
        if field == "rope_scaling":
            value = {k: v for k, v in value.items() if k != "rope_theta"}
        assert getattr(ours.config, field) == value, field
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) == ours.config.num_parameters()
    # the weights file alone, its config.json beside it read as transformers reads it
    assert load_model(ours.source / "model.safetensors").config.to_dict() == ours.config.to_dict()


def test_logits_match_transformers(pair):
    family, hf, ours = pair
    ids = random_ids(2, SEQ, 1)  # longer than every sliding window
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def _with_activation(pair, folder, activation: str):
    """A copy of the pair's saved folder whose config.json names ``activation``."""
    folder = shutil.copytree(pair[2].source, folder)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, "hidden_act": activation}))
    return folder


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu", "sigmoid"])
def test_an_mlp_activation_other_than_silu_is_refused(pair, tmp_path, activation):
    """Every family's transformers class computes its MLP with config.json's hidden_act; ds-sft's is
    silu, so a model of another activation is refused (read from the folder, or from its weights file
    with the config beside it), never loaded as a different network."""
    folder = _with_activation(pair, tmp_path / "model", activation)
    for spec in (folder, folder / "model.safetensors"):
        with pytest.raises(UserError, match=f"hidden_act '{activation}'"):
            load_model(spec)


def test_swish_is_silu(pair, tmp_path):
    family, hf, ours = pair
    folder = _with_activation(pair, tmp_path / "model", "swish")
    ids = random_ids(2, SEQ, 1)
    with torch.no_grad():
        assert (load_model(folder).eval()(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def assert_packed_equals_alone(packed_model, alone_model, ids, lengths: list[int], atol: float) -> None:
    """``packed_model`` on one row of documents of ``lengths`` (positions restart, attention stays
    inside each) gives each document's logits as ``alone_model`` computes them on it alone."""
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = packed_model(ids, positions, documents)
        start = 0
        for n in lengths:
            alone = alone_model(ids[:, start : start + n])
            torch.testing.assert_close(packed[:, start : start + n], alone, rtol=0, atol=atol)
            start += n


@pytest.mark.parametrize("lengths", [[13, 20, 7], [40], [1, 38, 1], [6, 6, 6, 6, 6, 6, 4]], ids=str)
def test_packed_row_equals_each_document_alone(pair, lengths):
    family, hf, ours = pair
    assert_packed_equals_alone(
        ours, lambda ids: hf(ids).logits, random_ids(1, sum(lengths), 2), lengths, 1e-4
    )


def test_kv_cache_greedy_generation_matches_transformers(pair):
    family, hf, ours = pair
    prompts = [random_ids(1, 9, 3)[0].tolist(), random_ids(1, 4, 4)[0].tolist()]  # left-padded together
    ours_tokens = generate(ours, prompts, max_new_tokens=24)  # prompt + 24 > every window
    for prompt, tokens in zip(prompts, ours_tokens, strict=True):
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24)
        assert tokens == theirs[0, len(prompt) :].tolist()


def test_export_writes_the_same_transformers_class(pair, tmp_path, word_tokenizer):
    from transformers import AutoModelForCausalLM

    family, hf, ours = pair
    export_hf(ours, word_tokenizer, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == [type(hf).__name__]
    assert written["model_type"] == hf.config.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    ids = random_ids(2, SEQ, 5)
    with torch.no_grad():
        assert (ours(ids) - reloaded(ids).logits).abs().max().item() <= 1e-4
    assert load_model(tmp_path / "hf").config.architecture() == ours.config.architecture()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trips_through_transformers(family):
    config = config_from_hf(hf_tiny_config(family))
    assert config_from_hf(hf_config(config)).to_dict() == config.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(config.architecture()))) == config


# ----------------------------------------------------------------------------- classes of inputs


def tiny_family(**switches) -> LlamaModel:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", n_layers=3, max_seq_len=96, **switches)
    return randomized(LlamaModel(config), 0)


@settings(max_examples=30, deadline=None)
@given(
    window=st.integers(1, 40),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    layer_types=st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=3, max_size=3),
)
def test_sliding_windows_keep_packed_documents_apart(window, lengths, layer_types):
    """Any window against any document lengths, any per-layer pattern: packed == each document alone."""
    model = tiny_family(family="qwen2", attention_bias=True, sliding_window=window, layer_types=layer_types)
    assert_packed_equals_alone(model, model, random_ids(1, sum(lengths), len(lengths)), lengths, 1e-5)


@settings(max_examples=12, deadline=None)
@given(
    window=st.integers(1, 20),  # the longest row holds 11 + 14 tokens: every window slides
    layer_types=st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=3, max_size=3),
    no_rope=st.lists(st.sampled_from([0, 1]), min_size=3, max_size=3),
)
def test_kv_cache_equals_recomputing_for_any_layer_pattern(window, layer_types, no_rope):
    """The dense KV-cache mask slides like the training paths: cached generation == no cache."""
    model = tiny_family(
        family="smollm3", sliding_window=window, layer_types=layer_types, no_rope_layers=no_rope
    )
    prompts = [random_ids(1, 11, 7)[0].tolist(), random_ids(1, 3, 8)[0].tolist()]
    cached = generate(model, prompts, max_new_tokens=14)
    assert cached == generate(model, prompts, max_new_tokens=14, use_cache=False)


def test_flex_attention_block_mask_slides_like_document_attention(monkeypatch):
    """The CUDA path's BlockMask (run here with eager flex_attention) against the CPU tiles."""
    import ds_sft.model.llama as llama

    model = tiny_family(family="mistral", sliding_window=9)
    ids = random_ids(2, 40, 9)
    documents = torch.tensor([[0] * 10 + [1] * 25 + [-1] * 5, [0] * 40])
    positions = torch.cat([torch.arange(10), torch.arange(25), torch.arange(5)]).expand(2, 40)
    with torch.no_grad():
        tiles = model(ids, positions, documents)
        plain = model(ids)  # no documents: one document, slid the same way
        monkeypatch.setattr(llama, "use_flex_attention", lambda device: True)
        monkeypatch.setattr(llama, "_compiled_flex_attention", lambda: llama.flex_attention)
        torch.testing.assert_close(model(ids, positions, documents), tiles, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ids), plain, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(family="gpt2"), "family 'gpt2': choose one of llama, qwen2"),
        (dict(qk_norm=True), "set family to qwen3"),
        (dict(family="qwen2"), "attention_bias=False is not the qwen2 family's"),
        (dict(sliding_window=8), "the llama family has no sliding windows"),
        (
            dict(family="mistral", sliding_window=0),
            "sliding_window must be an integer from 1 to 1,048,576, got 0",
        ),
        (
            dict(family="mistral", sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
            "slides on every layer or none",
        ),
        (
            dict(family="qwen3", qk_norm=True, layer_types=["sliding_attention"] * 2),
            "sliding_window is not set",
        ),
        (
            dict(family="smollm3", no_rope_layers=[1]),
            "no_rope_layers must list one of 0, 1 for each of the 2",
        ),
        (dict(no_rope_layers=[1, 0]), "no_rope_layers is SmolLM3's"),
        (dict(n_heads=3, n_kv_heads=1), "d_model 64 is not divisible by n_heads 3: set head_dim"),
        (dict(head_dim=0), "head_dim must be an integer from 2 to 1,024, got 0"),
        (dict(head_dim=15), "head_dim 15 must be even"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling type 'yarn' is not supported",
        ),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            r"rope_scaling\.low_freq_factor must be a finite number > 0 and <= 1,000,000, got None",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_config_mistakes_are_one_line(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.preset("tiny", **fields)


def test_configs_saved_before_the_families_load_as_llama(tmp_path):
    """A model_config.json without the family fields (every checkpoint before them) is a LLaMA, and a
    LLaMA config still saves without them (so resuming compares equal)."""
    old = ModelConfig.preset("tiny").architecture()
    assert not {"family", "qk_norm", "sliding_window", "head_dim"} & set(old)
    (tmp_path / "model_config.json").write_text(json.dumps(old))
    loaded = ModelConfig.load(tmp_path / "model_config.json")
    assert (loaded.family, loaded.attention_bias, loaded.qk_norm, loaded.rope_scaling) == (
        "llama",
        False,
        False,
        None,
    )
    assert ModelConfig.preset("tiny", family="qwen3", qk_norm=True).architecture()["family"] == "qwen3"
    assert ModelConfig.preset("tiny", head_dim=16).architecture() == old  # 16 = 64 // 4: not saved


@pytest.mark.parametrize("head_dim", [2, 8, 16, 24, 32, 128])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (3, 1), (6, 6)])
def test_head_dim_sets_every_attention_width(head_dim, n_heads, n_kv_heads):
    """q and o are n_heads x head_dim wide, k and v n_kv_heads x head_dim, whatever d_model is (it need
    not divide by n_heads); the parameter count is the model's, and the config saves head_dim exactly
    when it is not d_model // n_heads."""
    config = ModelConfig.preset("tiny", n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    model = LlamaModel(config)
    attn = model.layers[0].attn
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    assert (attn.q_proj.weight.shape, attn.o_proj.weight.shape) == ((q, 64), (64, q))
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv, 64)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    assert ("head_dim" in config.architecture()) == (n_heads * head_dim != 64)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.architecture()))) == config
    ids = random_ids(2, 9, seed=head_dim)
    assert model(ids).shape == (2, 9, VOCAB)


def test_unsupported_model_type_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(
        UserError, match="model_type 'gpt2' is not supported; ds-sft reads llama, qwen2, qwen3"
    ):
        config_from_hf(GPT2Config())


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize("key", sorted(LLAMA3_SCALING.keys() - {"rope_type"}))
@pytest.mark.parametrize("value", [1e308, 1e300, 2e6, (1 << 20) + 1, float("inf"), float("nan"), 0, -1.0])
def test_rope_scaling_out_of_range_is_one_line(key, value):
    """A hand-edited rope_scaling past its range: one line naming the key (a 1e300 position count once
    became a 300-digit integer that the RoPE table's float64 could not hold: OverflowError)."""
    scaling = {**LLAMA3_SCALING, key: value}
    with pytest.raises(UserError, match=rf"rope_scaling\.{key} must be a finite number > 0 and <= "):
        ModelConfig.preset("tiny", rope_scaling=scaling)


@pytest.mark.parametrize("factor", [1e-320, 5e-324])
def test_rope_scaling_whose_angles_overflow_is_one_line(factor):
    """A factor so small that dividing by it overflows: the RoPE table would be NaN; refused by name."""
    config = ModelConfig.preset("tiny", rope_scaling={**LLAMA3_SCALING, "factor": factor})
    with pytest.raises(UserError, match="non-finite angles"):
        LlamaModel(config)
