"""The model against independent references: transformers' LlamaForCausalLM, F.cross_entropy,
documents run alone, and itself under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_sft.errors import UserError
from ds_sft.model.config import KERNEL_BACKENDS, PRESETS, ModelConfig
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import PROJECTIONS, LlamaModel
from ds_sft.model.param_names import to_hf_state_dict

TINY_VARIANTS = {
    "gqa-tied": {},
    "gqa-untied": {"tie_embeddings": False},
    "mha-untied": {"n_kv_heads": 4, "tie_embeddings": False, "rope_theta": 500.0, "norm_eps": 1e-6},
}


def tiny_model(seed: int = 0, **overrides) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(ModelConfig.preset("tiny", kernels="eager", **overrides)).eval()
    with torch.no_grad():  # norms start at 1; perturb them so a misplaced norm weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def test_projections_name_every_linear_of_a_block():
    """fp8 swaps and AdamW decays the modules named in PROJECTIONS: a projection renamed or added
    without its name there would stay in bf16 and go undecayed, without a word."""
    for block in tiny_model().layers:
        linears = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        assert tuple(name.rsplit(".", 1)[-1] for name in linears) == PROJECTIONS


def hf_twin(model: LlamaModel):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and model.config.tie_embeddings == bool(missing)
    return hf


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_logits_match_transformers(variant):
    model = tiny_model(**TINY_VARIANTS[variant])
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, 37, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_is_the_sum_of_token_cross_entropies():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20))
    labels = torch.randint(0, 256, (2, 20))
    labels[0, :7] = -100
    labels[1, 15:] = -100
    loss = model(ids, labels=labels)
    with torch.no_grad():
        logits = model(ids)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# Short documents in one attention tile, and documents across the 64-token tiles of
# document_attention (the CPU path for packed rows), one boundary on a tile edge (10 + 54 = 64).
@pytest.mark.parametrize(("lengths", "padding"), [([5, 11, 3], 4), ([10, 54, 45, 13], 6)])
def test_packed_row_equals_each_document_alone(lengths, padding):
    model = tiny_model()
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    ids = torch.cat([*docs, torch.zeros(padding, dtype=torch.long)])[None]
    document_ids = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((padding,), -1)]
    )
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(padding)])
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids[None], document_ids=document_ids[None])[0]
        alone = torch.cat([model(doc[None])[0] for doc in docs])
        unmasked = model(ids)[0]
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed[: sum(lengths)], alone, rtol=0, atol=1e-5)
    # without the document mask the later documents do see the earlier ones: the test can fail
    assert (unmasked[lengths[0] : sum(lengths)] - alone[lengths[0] :]).abs().max() > 1e-3


@pytest.mark.parametrize("length", [9, 60])  # 60: the second document crosses a tile edge
def test_packed_loss_and_gradients_equal_the_documents_alone(length):
    model = tiny_model()
    a, b = torch.randint(0, 256, (2, length))
    ids = torch.cat([a, b])[None]
    labels = torch.cat([a[1:], torch.tensor([-100]), b[1:], torch.tensor([-100])])[None]
    positions = torch.cat([torch.arange(length), torch.arange(length)])[None]
    documents = torch.cat([torch.zeros(length), torch.ones(length)]).long()[None]
    packed = model(ids, position_ids=positions, document_ids=documents, labels=labels)
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = sum(model(d[None], labels=torch.cat([d[1:], torch.tensor([-100])])[None]) for d in (a, b))
    alone.backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for packed_grad, param in zip(packed_grads, model.parameters(), strict=True):
        torch.testing.assert_close(packed_grad, param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    config = ModelConfig.preset(name)
    with torch.device("meta"):
        model = LlamaModel(config)
    assert model.num_parameters() == config.num_parameters()
    assert model.lm_head is None  # every preset ties its embeddings


def test_config_json_round_trip(tmp_path):
    config = ModelConfig.preset("smollm2-135m", kernels="torch", activation_checkpointing=True)
    config.save(tmp_path / "c.json")
    loaded = ModelConfig.load(tmp_path / "c.json")
    assert loaded.architecture() == config.architecture()
    # the run settings are not saved: a loaded config has the defaults until a run sets its own
    assert (loaded.kernels, loaded.activation_checkpointing) == ("auto", False)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for flag in (False, True):
        model = tiny_model(activation_checkpointing=flag).train()
        model(ids, labels=ids).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_model_equals_eager():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 24))
    documents = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    with torch.no_grad():
        # fullgraph: a graph break is an error. Packed rows break the graph once per layer on CPU
        # (document_attention's tile buckets depend on the data), so they compile without it.
        whole = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(whole(ids), model(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            torch.compile(model)(ids, position_ids=positions, document_ids=documents),
            model(ids, position_ids=positions, document_ids=documents),
            rtol=1e-4,
            atol=1e-4,
        )


def test_flex_attention_path_equals_the_dense_mask(monkeypatch):
    """The CUDA path for packed rows (a flex_attention BlockMask), run here with eager flex_attention."""
    import ds_sft.model.llama as llama

    model = tiny_model()
    ids = torch.randint(0, 256, (2, 40))
    documents = torch.tensor([[0] * 10 + [1] * 25 + [-1] * 5, [0] * 40])
    positions = torch.cat([torch.arange(10), torch.arange(25), torch.arange(5)]).expand(2, 40)
    with torch.no_grad():
        dense = model(ids, positions, documents)
        monkeypatch.setattr(llama, "use_flex_attention", lambda device: True)
        monkeypatch.setattr(llama, "_compiled_flex_attention", lambda: llama.flex_attention)
        flex = model(ids, positions, documents)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def random_documents(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    """Document ids of packed rows: up to 5 documents at random cuts, then a padded tail (-1)."""
    starts = torch.randint(1, length, (rows, 4), generator=generator)
    documents = (torch.arange(length)[None, :, None] >= starts[:, None, :]).sum(-1)
    documents[:, length - int(torch.randint(0, 30, (), generator=generator)) :] = -1
    return documents


def test_a_new_batchs_document_mask_reuses_the_compiled_flex_attention():
    """Every batch packs its documents differently, so every step builds a new BlockMask whose
    mask_mod closes over new document ids. Were dynamo to guard on that closure, each step would
    recompile (flex_attention, and the mask's creation, compiled too), and after its recompile limit
    (8) fall back to eager for good: correct, silent, and many times slower on the GPU. One compile
    per mask kind (causal, sliding window)."""
    import torch._dynamo

    import ds_sft.model.llama as llama

    torch._dynamo.reset()
    llama._compiled_flex_attention.cache_clear()
    llama._compiled_create_block_mask.cache_clear()
    attend = llama._compiled_flex_attention()
    generator = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 256, 16
    q, k, v = (torch.randn(B, H, T, D, generator=generator) for _ in range(3))

    def batch_documents():
        return random_documents(generator, B, T)

    with torch.no_grad():
        for window in (None, 64):  # the first batch of each kind compiles
            attend(q, k, v, block_mask=llama._document_block_mask(batch_documents(), window))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                for window in (None, 64):
                    attend(q, k, v, block_mask=llama._document_block_mask(batch_documents(), window))
    assert llama._compiled_create_block_mask.cache_info().currsize == 1  # the masks were made compiled


@pytest.mark.parametrize("window", [None, 64])
def test_the_compiled_document_block_mask_is_the_eager_one(window):
    """The compiled mask creation (what every step uses) against create_block_mask run eagerly on the
    same mask_mod: the same blocks, partial and full, for rows of random documents and padding."""
    import ds_sft.model.llama as llama

    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        documents = random_documents(generator, 3, 384)
        compiled = llama._document_block_mask(documents, window)
        eager = llama.create_block_mask(compiled.mask_mod, 3, None, 384, 384, device=documents.device)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(compiled, field), getattr(eager, field)), field


def test_config_errors_name_the_problem():
    from ds_sft import kernels

    assert kernels.BACKENDS == KERNEL_BACKENDS
    with pytest.raises(UserError, match="n_kv_heads"):
        ModelConfig.preset("tiny", n_kv_heads=3)
    with pytest.raises(UserError, match="kernels 'cuda'"):
        ModelConfig.preset("tiny", kernels="cuda")
    with pytest.raises(UserError, match="unknown model config fields"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.raises(UserError, match="unknown model preset"):
        ModelConfig.preset("7b")


def test_llama3_frequencies_refuse_another_scaling_without_assert():
    """The check was an ``assert`` (gone under ``python -O``, when a 'yarn' dict was rescaled as llama3)."""
    from ds_sft.model.llama import llama3_frequencies

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    assert llama3_frequencies(inv_freq, "llama3", **scaling).shape == inv_freq.shape
    with pytest.raises(ValueError, match="rope_type 'yarn' is not 'llama3'"):
        llama3_frequencies(inv_freq, "yarn", **scaling)
