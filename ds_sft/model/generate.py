"""Batched greedy text generation with a KV cache: each step takes every row's most likely token.

Prompts of different lengths share one batch by *left* padding, so every row's next token sits in
the last column. The padding must not change the answer, which takes two things:

- attention: the padding is its own document (``document_ids = -1``, the prompt and its completion
  are document 0), so no real token attends to it (see :mod:`ds_sft.model.llama`);
- positions: each row counts from its own first real token (padding gets position 0, unused).

A :class:`~ds_sft.model.llama.KVCache` keeps every layer's keys and values, so after one forward
over the prompts (the "prefill") each new token costs one forward of a single column. A row stops at
one of ``eos_ids`` (pass the tokenizer's EOS *and* the chat template's end-of-turn token when they
differ), or when its decoded completion contains one of ``stop_strings``; the batch stops when every
row has, or after ``max_new_tokens``.

``repetition_penalty`` (CTRL, Keskar et al. 2019; transformers' ``RepetitionPenaltyLogitsProcessor``)
makes every token already in the row (prompt or completion) less likely before choosing: its logit
is divided by the penalty when positive, multiplied when negative. 1.0 is off; ~1.1-1.3 breaks the
loops a small fine-tuned model falls into ("... 12 + 12 = 24. 12 + 12 = 24. ...").

A finished row would otherwise keep costing a full share of every step (its cache is read by the
attention like any other row's) while the slowest row is still writing. So once a quarter of the
rows still computed have finished, those rows leave the batch: their cache rows are dropped and the
step shrinks. Shrinking in quarters copies the cache only a logarithmic number of times. Each row's
tokens do not depend on its neighbours, so in float32 the answers are the same either way (and the
same for any batch size). In bfloat16 the batch's shape changes how the matmuls round, and where two
tokens nearly tie the choice can flip: answers may differ with the batch size (``eval --dtype
float32`` holds them fixed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ds_sft.errors import UserError
from ds_sft.model.llama import KVCache, LlamaModel
from ds_sft.options import INT64_MAX, REPETITION_PENALTY, Int, checked

NEW_TOKENS = Int(0, INT64_MAX)  # max_new_tokens: 0 answers nothing; the model's max_seq_len bounds it later

# Drop the finished rows from the batch once at most this share of it is still writing.
SHRINK_AT = 0.75


# Prompt tokens per forward while the cache is filled. A forward's mask and attention scores grow with
# its tokens times the keys cached, so eight 7,000-token prompts in one forward took 2 GB more.
PREFILL_CHUNK = 512


def _prefill(model: LlamaModel, cache: KVCache, ids, positions, documents) -> torch.Tensor:
    """The prompts into ``cache``, :data:`PREFILL_CHUNK` tokens at a time; the last chunk's hidden
    states (its last position is where the first new token comes from)."""
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        part = slice(start, start + PREFILL_CHUNK)
        hidden = model.hidden_states(ids[:, part], positions[:, part], documents[:, part], kv_cache=cache)
    return hidden


def non_finite_logits(model) -> str:
    """Why a model whose forward gave NaN or inf cannot be scored or generate (one line)."""
    dtype = str(model.wte.weight.dtype).removeprefix("torch.")
    instead = "" if dtype == "float32" else ", or evaluate in float32 (--dtype float32)"
    return (
        f"the model's logits are not finite (NaN or inf): its activations overflow in {dtype} or its "
        f"weights are damaged; check the checkpoint{instead}"
    )


@torch.inference_mode()
def generate(
    model: LlamaModel,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    eos_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """Complete each prompt; return the new token ids of each (without the EOS that ended it).

    Each new token is the argmax of its logits (after the repetition penalty, when one is set).
    ``stop_strings`` need ``decode`` (token ids -> text); a completion stopped by one ends with the token that
    completed it (cut the text with :func:`cut_at_stop_string`). ``use_cache=False`` recomputes the
    whole sequence at every step (the reference the cache is tested against).
    """
    if stop_strings and decode is None:
        raise UserError("stop strings need a decode function (token ids -> text)")
    _check_settings(max_new_tokens, repetition_penalty)
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise UserError("generate needs at least one prompt, and every prompt at least one token")
    vocab = model.config.vocab_size
    if any(not 0 <= token < vocab for prompt in prompts_ids for token in prompt):
        raise UserError(f"a prompt holds a token id outside the model's vocabulary (0 to {vocab - 1:,})")
    if not 0 <= pad_id < vocab:  # padding is never attended to, but it is looked up in the embedding
        raise UserError(
            f"the padding token id {pad_id} is outside the model's vocabulary (0 to {vocab - 1:,}): the "
            "tokenizer's pad token is not one of the model's tokens"
        )
    device = next(model.parameters()).device
    batch, width = len(prompts_ids), max(len(p) for p in prompts_ids)
    if width + max_new_tokens > model.config.max_seq_len:
        raise UserError(
            f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {model.config.max_seq_len}: shorten the prompt or lower max_new_tokens"
        )

    ids, positions, documents = left_pad(prompts_ids, pad_id, device)
    lengths = torch.tensor([len(p) for p in prompts_ids], device=device)
    rows = torch.arange(batch, device=device)  # the prompt each batch row still computed answers
    with _eval_mode(model):  # train mode would checkpoint activations around the cache
        cache = (
            KVCache(model.config, batch, width + max_new_tokens, model.wte.weight.dtype, device)
            if use_cache
            else None
        )
        step_ids, step_positions, step_documents = ids, positions, documents
        completions: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        # which tokens each row has seen (prompt and completion), for the repetition penalty
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
            real = documents >= 0  # not the left padding
            seen[torch.arange(batch, device=device)[:, None].expand_as(ids)[real], ids[real]] = True
        for step in range(max_new_tokens):
            if step == 0 and cache is not None:
                hidden = _prefill(model, cache, step_ids, step_positions, step_documents)
            else:
                hidden = model.hidden_states(step_ids, step_positions, step_documents, kv_cache=cache)
            logits = model.logits(hidden[:, -1]).float()
            if step == 0 and not bool(torch.isfinite(logits).all()):  # argmax of NaN is still a token
                raise UserError(non_finite_logits(model))
            if seen is not None:
                logits = penalize_repetitions(logits, seen, repetition_penalty)
            next_ids = logits.argmax(dim=-1)
            if seen is not None:
                seen[torch.arange(len(next_ids), device=device), next_ids] = True
            is_eos = torch.isin(next_ids, eos).tolist()
            for prompt, token, ends in zip(rows.tolist(), next_ids.tolist(), is_eos, strict=True):
                if finished[prompt]:
                    continue
                if ends:
                    finished[prompt] = True
                    continue
                completion = completions[prompt]
                completion.append(token)
                finished[prompt] = bool(stop_strings) and _ends_with_stop(completion, stop_strings, decode)
            live = [i for i, prompt in enumerate(rows.tolist()) if not finished[prompt]]
            if not live:
                break
            if len(live) <= SHRINK_AT * len(rows):
                keep = torch.tensor(live, device=device)
                rows, lengths, next_ids = rows[keep], lengths[keep], next_ids[keep]
                seen = seen[keep] if seen is not None else None
                if cache is not None:
                    cache.keep_rows(keep)
                else:
                    step_ids, step_positions, step_documents = (
                        t[keep] for t in (step_ids, step_positions, step_documents)
                    )
            new_positions = (lengths + step)[:, None]
            new_documents = torch.zeros_like(new_positions)
            if cache is not None:  # feed only the new column
                step_ids, step_positions, step_documents = next_ids[:, None], new_positions, new_documents
            else:  # feed everything again
                step_ids = torch.cat([step_ids, next_ids[:, None]], dim=1)
                step_positions = torch.cat([step_positions, new_positions], dim=1)
                step_documents = torch.cat([step_documents, new_documents], dim=1)
        return completions


def _check_settings(max_new_tokens, repetition_penalty) -> None:
    """One line for a setting out of its domain. Past them torch failed deep inside (a negative
    max_new_tokens sized the cache below zero) or generated as if the setting were sane (a NaN
    penalty)."""
    checked("max_new_tokens", max_new_tokens, NEW_TOKENS)
    checked("repetition_penalty", repetition_penalty, REPETITION_PENALTY)


def left_pad(prompts_ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """``(input_ids, position_ids, document_ids)`` of the prompts right-aligned in one batch."""
    width = max(len(p) for p in prompts_ids)
    ids = torch.full((len(prompts_ids), width), pad_id, dtype=torch.long, device=device)
    documents = torch.full_like(ids, -1)
    for row, prompt in enumerate(prompts_ids):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), device=device)
        documents[row, width - len(prompt) :] = 0
    padding = (documents < 0).sum(dim=1, keepdim=True)
    positions = (torch.arange(width, device=device) - padding).clamp(min=0)
    return ids, positions, documents


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the duration, then the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits [B, V]`` with each row's seen tokens (``seen [B, V]`` bool) made less likely:
    a positive logit divided by ``penalty``, a negative one multiplied (both move it down for > 1)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _ends_with_stop(tokens: list[int], stop_strings: Sequence[str], decode) -> bool:
    """Did the last token complete a stop string? Decodes only a tail long enough to hold one."""
    tail = max(len(s) for s in stop_strings) + 2  # every token is at least one character (or a byte of one)
    return any(s in decode(tokens[-tail:]) for s in stop_strings)


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the first stop string in it."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]
