"""Generation: the KV cache and left padding change nothing; EOS and stop strings behave."""

from __future__ import annotations

import pytest
import torch

from ds_sft.errors import UserError
from ds_sft.model.config import ModelConfig
from ds_sft.model.generate import cut_at_stop_string, generate
from ds_sft.model.hf_families import hf_config
from ds_sft.model.llama import LlamaModel
from ds_sft.model.param_names import to_hf_state_dict

PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2], [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211]]


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.manual_seed(0)
    # a larger init spreads the logits, so greedy choices are not near-ties that rounding could flip
    return LlamaModel(ModelConfig.preset("tiny", kernels="eager", init_std=0.2)).eval()


def test_batched_kv_cache_greedy_equals_each_prompt_alone_without_cache(model):
    batched = generate(model, PROMPTS, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12, use_cache=False)[0] for p in PROMPTS]
    assert batched == alone
    assert generate(model, PROMPTS, max_new_tokens=12, use_cache=False) == batched
    assert all(len(c) == 12 for c in batched)


def test_greedy_equals_transformers_generate_with_left_padding(model):
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = _hf_twin(model).generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert generate(model, PROMPTS, max_new_tokens=10) == out[:, width:].tolist()


def _hf_twin(model):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.config))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    return hf.eval()


def test_rows_that_finish_leave_the_batch_without_changing_the_others(model):
    prompts = PROMPTS + [[7] * 5, [11, 12], list(range(30, 40)), [250] * 9, [1]]
    free = generate(model, prompts, max_new_tokens=16)
    # one end token from each of four rows, at different steps: rows end at different times
    eos = [free[row][3 + 3 * row] for row in range(4)]
    ends = [min((c.index(e) for e in eos if e in c), default=None) for c in free]
    # several rows leave, at different steps, so the batch shrinks more than once
    assert sum(e is not None for e in ends) >= 4 and len(set(ends)) >= 4

    stopped = generate(model, prompts, max_new_tokens=16, eos_ids=eos)
    assert stopped == [c[:e] if e is not None else c for c, e in zip(free, ends, strict=True)]
    alone = [generate(model, [p], max_new_tokens=16, eos_ids=eos, use_cache=False)[0] for p in prompts]
    assert stopped == alone
    assert generate(model, prompts, max_new_tokens=16, eos_ids=eos, use_cache=False) == stopped

    width = max(map(len, prompts))
    out = _hf_twin(model).generate(
        input_ids=torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )
    # transformers keeps finished rows in its batch and pads them after their end token
    hf_rows = [_cut_at_first(row, eos) for row in out[:, width:].tolist()]
    assert stopped == hf_rows


def _cut_at_first(tokens: list[int], ends: list[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in ends), tokens)


def test_eos_and_stop_strings_end_a_row(model):
    free = generate(model, PROMPTS, max_new_tokens=8)
    eos = free[1][3]
    stopped = generate(model, PROMPTS, max_new_tokens=8, eos_ids=[eos])
    for row, completion in enumerate(free):
        expected = completion[: completion.index(eos)] if eos in completion else completion
        assert stopped[row] == expected

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    stop = f"<{free[0][1]}><{free[0][2]}>"
    by_string = generate(model, PROMPTS[:1], max_new_tokens=8, stop_strings=[stop], decode=decode)
    assert by_string == [free[0][:3]]
    assert cut_at_stop_string(decode(by_string[0]), [stop, "never"]) == f"<{free[0][0]}>"
    with pytest.raises(UserError, match="decode"):
        generate(model, PROMPTS, stop_strings=["x"])


def test_prompt_longer_than_the_rope_table_is_refused(model):
    with pytest.raises(UserError, match="max_seq_len 128"):
        generate(model, [[1] * 100], max_new_tokens=29)


def test_generate_during_training_restores_train_mode(model):
    expected = generate(model, PROMPTS, max_new_tokens=5)
    model.config.activation_checkpointing = True
    model.train()
    try:
        assert generate(model, PROMPTS, max_new_tokens=5) == expected
        assert model.training
    finally:
        model.config.activation_checkpointing = False
        model.eval()


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers_generate(model, penalty):
    """Greedy with a repetition penalty, token for token against transformers' generate (its
    RepetitionPenaltyLogitsProcessor) on the same weights; prompts of one length, because
    transformers also penalizes the left padding tokens."""
    prompts = [[5, 17, 99, 5, 5, 40], [3, 1, 4, 1, 5, 9]]
    out = _hf_twin(model).generate(
        input_ids=torch.tensor(prompts),
        attention_mask=torch.ones(2, 6, dtype=torch.long),
        max_new_tokens=14,
        do_sample=False,
        repetition_penalty=penalty,
        pad_token_id=0,
        eos_token_id=None,
    )
    ours = generate(model, prompts, max_new_tokens=14, repetition_penalty=penalty)
    assert ours == out[:, 6:].tolist()
    assert ours != generate(model, prompts, max_new_tokens=14)  # the penalty changed the answers
    alone = [
        generate(model, [p], max_new_tokens=14, repetition_penalty=penalty, use_cache=False)[0]
        for p in prompts
    ]
    assert alone == ours


def test_repetition_penalty_ignores_left_padding_and_follows_shrinking_batches(model):
    """A row's penalty sees only its own tokens: batched with padding (and rows leaving the batch
    early) equals each prompt alone."""
    batched = generate(model, PROMPTS, max_new_tokens=12, repetition_penalty=1.5, eos_ids=[7, 77, 177])
    alone = [
        generate(model, [p], max_new_tokens=12, repetition_penalty=1.5, eos_ids=[7, 77, 177])[0]
        for p in PROMPTS
    ]
    assert batched == alone


def test_repetition_penalty_formula():
    from ds_sft.model.generate import penalize_repetitions

    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetitions(logits, seen, 2.0).tolist() == [[1.0, -4.0, 3.0, -1.0]]


NAN, INF = float("nan"), float("inf")
# (arguments, words of the refusal): each setting out of its range, and prompts the model cannot read
BAD_ARGUMENTS = [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0 and <= 100"),
    (dict(repetition_penalty=-1.5), "repetition_penalty must be a finite number > 0 and <= 100"),
    (dict(repetition_penalty=NAN), "repetition_penalty must be a finite number > 0 and <= 100"),
    (dict(repetition_penalty=INF), "repetition_penalty must be a finite number > 0 and <= 100"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer from 0 to"),
    (dict(max_new_tokens=-100), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(prompts_ids=[[1, 256]]), "outside the model's vocabulary"),
    (dict(prompts_ids=[[3], [-1, 2]]), "outside the model's vocabulary"),
    # an IndexError from the embedding once prompts of different lengths were padded
    (dict(prompts_ids=[[3], [1, 2]], pad_id=256), "padding token id 256 is outside"),
    (dict(prompts_ids=[[3], [1, 2]], pad_id=-1), "padding token id -1 is outside"),
]


@pytest.mark.parametrize(("arguments", "words"), BAD_ARGUMENTS, ids=lambda v: str(v)[:40])
def test_settings_out_of_range_are_one_line(model, arguments, words):
    with pytest.raises(UserError, match=words):
        generate(model, **{"prompts_ids": PROMPTS, "max_new_tokens": 2, **arguments})


def test_no_new_tokens_is_an_empty_completion_per_prompt(model):
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]


@pytest.mark.parametrize("chunk", [1, 2, 5, 512])
def test_prompts_filled_into_the_cache_in_chunks_generate_what_one_forward_does(model, monkeypatch, chunk):
    """The cache is filled PREFILL_CHUNK prompt tokens per forward: eight 7,000-token prompts in one
    forward built a [8, 1, 7000, 7000] mask and its scores (2.5 GB). Chunks change no token, each
    forward holds at most a chunk, and generation runs in inference mode (no autograd graph kept)."""
    import ds_sft.model.generate

    monkeypatch.setattr(ds_sft.model.generate, "PREFILL_CHUNK", chunk)
    widths, modes = [], []
    real = model.hidden_states

    def recording(ids, *args, **kwargs):
        widths.append(ids.shape[1])
        modes.append(torch.is_inference_mode_enabled())
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", recording)
    chunked = generate(model, PROMPTS, max_new_tokens=6)
    monkeypatch.setattr(model, "hidden_states", real)
    assert chunked == generate(model, PROMPTS, max_new_tokens=6, use_cache=False)
    assert max(widths) == min(chunk, max(map(len, PROMPTS))) and all(modes)
