"""Validation loss, perplexity and next-token accuracy, per source and overall.

The val split is the packed rows ``prepare`` wrote: each row holds several documents, each token
knows its source (``source_ids``) and its target (``labels``, already shifted, ``-100`` where
nothing is trained). The model's own loss is one sum over all sources, so here the logits come back
and the cross-entropy of every trained token is computed in fp32 and summed into per-source
buckets:

    loss(s)       = sum of -log p(label) over trained tokens of source s / their count
    perplexity(s) = exp(loss(s))
    accuracy(s)   = share of those tokens where argmax(logits) == label

"overall" pools every trained token, so it weighs sources by their tokens (like training does),
not by a plain mean over sources. Cross-entropy runs over a few thousand positions at a time: fp32
logits of a whole batch at a 49k-50k vocabulary would be gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CE_CHUNK_TOKENS = 2048


@dataclass
class TokenTotals:
    """Running sums per source: summed loss, correct predictions, trained tokens."""

    loss_sum: torch.Tensor  # float64 [num_sources]
    correct: torch.Tensor  # int64 [num_sources]
    tokens: torch.Tensor  # int64 [num_sources]

    @classmethod
    def zeros(cls, num_sources: int) -> TokenTotals:
        return cls(
            torch.zeros(num_sources, dtype=torch.float64),
            torch.zeros(num_sources, dtype=torch.int64),
            torch.zeros(num_sources, dtype=torch.int64),
        )

    def add(self, logits: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor) -> None:
        """Fold in trained positions: ``logits`` [N, V], ``labels`` and ``source_ids`` [N]."""
        if bool((source_ids < 0).any()):
            raise ValueError("a trained token (label != -100) has no source (source_id -1)")
        losses = F.cross_entropy(logits.float(), labels, reduction="none").double().cpu()
        hits = (logits.argmax(dim=-1) == labels).long().cpu()
        sources = source_ids.cpu()
        self.loss_sum.index_add_(0, sources, losses)
        self.correct.index_add_(0, sources, hits)
        self.tokens.index_add_(0, sources, torch.ones_like(hits))

    def summary(self, sources: list[str]) -> dict:
        """``{"overall": metrics, "by_source": {name: metrics}}``; sources without tokens are left out."""

        def metrics(loss_sum: float, correct: int, tokens: int) -> dict:
            loss = loss_sum / tokens
            return {
                "loss": loss,
                "perplexity": math.exp(loss),
                "token_accuracy": correct / tokens,
                "tokens": tokens,
            }

        by_source = {
            name: metrics(self.loss_sum[i].item(), int(self.correct[i]), int(self.tokens[i]))
            for i, name in enumerate(sources)
            if self.tokens[i] > 0
        }
        total = int(self.tokens.sum())
        if total == 0:
            raise ValueError("no trained tokens in the evaluated rows")
        overall = metrics(self.loss_sum.sum().item(), int(self.correct.sum()), total)
        return {"overall": overall, "by_source": by_source}


@torch.no_grad()
def validation_metrics(model, dataset, batch_size: int, max_rows: int | None = None) -> dict:
    """Per-source and overall loss / perplexity / accuracy of ``model`` on a ``PackedDataset``."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    rows = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    totals = TokenTotals.zeros(len(dataset.sources))
    model.eval()
    for start in tqdm(range(0, rows, batch_size), desc="val", unit="batch"):
        items = [dataset[i] for i in range(start, min(start + batch_size, rows))]
        batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
        hidden = model.hidden_states(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )
        trained = batch["labels"] != IGNORE_INDEX
        hidden, labels, sources = hidden[trained], batch["labels"][trained], batch["source_ids"][trained]
        for chunk in range(0, labels.numel(), CE_CHUNK_TOKENS):
            window = slice(chunk, chunk + CE_CHUNK_TOKENS)
            totals.add(model.logits(hidden[window]), labels[window], sources[window])
    return {**totals.summary(list(dataset.sources)), "rows": rows}
