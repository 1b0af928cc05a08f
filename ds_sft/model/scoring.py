"""Validation metrics per source: the one evaluator behind ``ds-sft train``'s evals and ``ds-sft eval``.

A packed val row holds several documents; each token knows its source (``source_ids``) and its
target (``labels``, already shifted, ``-100`` where nothing is trained). The model's training loss
is one sum over all sources, so for evaluation the model's forward returns, for every trained
position, its fp32 cross-entropy and whether the top logit is the label (``scores=True``, see
:func:`token_scores`). They are summed into one ``[num_sources, 3]`` float64 table per source::

    loss(s)       = sum of -log p(label) over trained tokens of source s / their count
    perplexity(s) = exp(loss(s))
    accuracy(s)   = share of those tokens where argmax(logits) == label

"overall" pools every trained token, so it weighs sources by their tokens (like training does).
Logits are made only for trained positions, a few thousand at a time: fp32 logits of a whole batch
at a 49k-50k vocabulary would be gigabytes.

The table is a plain tensor on the model's device, so a trainer can all-reduce it across ranks
before :func:`summarize`; nothing here talks to other processes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ds_sft.labels import IGNORE_INDEX

SCORE_CHUNK_TOKENS = 2048
MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "labels")


@torch.compiler.disable(reason="the trained positions are a data-dependent selection")
def token_scores(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = SCORE_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, hits)`` of the trained positions of ``hidden [..., d] @ weight[V, d].T``, in the order
    of ``labels[labels != -100]``: fp32 ``-log p(label)`` and ``argmax == label`` (bool)."""
    trained = labels != IGNORE_INDEX
    hidden, labels = hidden[trained], labels[trained]
    losses, hits = [], []
    for start in range(0, labels.numel(), chunk_tokens):
        window = slice(start, start + chunk_tokens)
        logits = F.linear(hidden[window], weight).float()
        losses.append(F.cross_entropy(logits, labels[window], reduction="none"))
        hits.append(logits.argmax(dim=-1) == labels[window])
    if not losses:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(
            0, dtype=torch.bool, device=hidden.device
        )
    return torch.cat(losses), torch.cat(hits)


def source_totals(
    losses: torch.Tensor, hits: torch.Tensor, source_ids: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """``[num_sources, 3]`` float64 on ``losses``' device: summed loss, correct predictions, tokens."""
    if bool((source_ids < 0).any()):
        raise ValueError("a trained token (label != -100) has no source (source_id -1)")
    values = torch.stack(
        [losses.double(), hits.double(), torch.ones_like(losses, dtype=torch.float64)], dim=1
    )
    totals = torch.zeros(num_sources, 3, dtype=torch.float64, device=losses.device)
    return totals.index_add_(0, source_ids.to(losses.device), values)


def _metrics(loss_sum: float, correct: float, tokens: float) -> dict:
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        "token_accuracy": correct / tokens,
        "tokens": int(tokens),
    }


def summarize(totals: torch.Tensor, sources: list[str]) -> dict:
    """``{"overall": metrics, "by_source": {name: metrics}}`` from a :func:`source_totals` table
    (summed over batches and ranks); sources without tokens are left out."""
    totals = totals.double().cpu()
    if totals[:, 2].sum() == 0:
        raise ValueError("no trained tokens in the evaluated rows")
    by_source = {name: _metrics(*totals[i].tolist()) for i, name in enumerate(sources) if totals[i, 2] > 0}
    return {"overall": _metrics(*totals.sum(0).tolist()), "by_source": by_source}


@torch.no_grad()
def score_rows(
    model,
    dataset,
    rows: list[int],
    batch_size: int,
    device,
    forward_context=contextlib.nullcontext,
    forwards: int | None = None,
    scored=None,
) -> torch.Tensor:
    """The :func:`source_totals` table of ``rows`` of a ``PackedDataset``, ``batch_size`` rows per forward.

    ``model`` is a ``LlamaModel`` or a DeepSpeed engine around one (called as ``model(...,
    scores=True)``, so ZeRO-3 gathers the weights inside its forward as usual). ``forwards``: run
    at least this many forwards; the extra ones read the split's row 0 and are not counted, so
    ranks holding different numbers of rows still run the same collectives (ZeRO-3). ``scored``: called
    with the number of rows after each counted forward (a progress bar's ``update``).
    """
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    totals = torch.zeros(len(dataset.sources), 3, dtype=torch.float64, device=device)
    for number in range(max(len(batches), forwards or 0)):
        counted = number < len(batches)
        items = [dataset[i] for i in (batches[number] if counted else [0])]
        batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
        with forward_context():
            losses, hits = model(**{key: batch[key] for key in MODEL_INPUTS}, scores=True)
        if counted:
            trained = batch["labels"] != IGNORE_INDEX
            totals += source_totals(losses, hits, batch["source_ids"][trained], len(dataset.sources))
            if scored is not None:
                scored(len(items))
    return totals
