"""Per-source validation metrics against a plain loop over tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ds_sft.eval import evaluate
from ds_sft.eval.evaluate import IGNORE_INDEX, TokenTotals


def _reference(logits, labels, source_ids, sources):
    """Token by token: the definition, no vectorisation."""
    per = {name: [] for name in sources}
    for logit, label, source in zip(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), source_ids.reshape(-1), strict=True
    ):
        if label == IGNORE_INDEX:
            continue
        loss = F.cross_entropy(logit.double()[None], label[None]).item()
        per[sources[source]].append((loss, int(logit.argmax() == label)))
    pooled = [x for values in per.values() for x in values]

    def metrics(values):
        loss = sum(v[0] for v in values) / len(values)
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "token_accuracy": sum(v[1] for v in values) / len(values),
            "tokens": len(values),
        }

    return metrics(pooled), {name: metrics(v) for name, v in per.items() if v}


def _batch(generator, batch=3, seq=37, vocab=23, n_sources=3):
    logits = torch.randn(batch, seq, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    source_ids = torch.randint(0, n_sources, (batch, seq), generator=generator)
    untrained = torch.rand(batch, seq, generator=generator) < 0.3
    labels[untrained] = IGNORE_INDEX
    source_ids[(torch.rand(batch, seq, generator=generator) < 0.5) & untrained] = -1  # padding
    # make a quarter of the predictions right so accuracy is not ~1/vocab
    hit = (torch.rand(batch, seq, generator=generator) < 0.25) & ~untrained
    logits[hit] = logits[hit].scatter(-1, labels[hit][:, None], 100.0)
    return logits, labels, source_ids


def test_totals_match_token_by_token_reference():
    generator = torch.Generator().manual_seed(0)
    sources = ["alpaca", "dolly", "gsm8k", "unused"]
    totals = TokenTotals.zeros(len(sources))
    batches = [_batch(generator) for _ in range(2)]
    for logits, labels, source_ids in batches:
        trained = labels != IGNORE_INDEX
        totals.add(logits.to(torch.bfloat16)[trained], labels[trained], source_ids[trained])
    summary = totals.summary(sources)

    logits = torch.cat([b[0].to(torch.bfloat16).float() for b in batches])
    overall, by_source = _reference(
        logits, torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches]), sources
    )
    assert "unused" not in summary["by_source"]
    assert summary["by_source"].keys() == by_source.keys()
    pairs = [(summary["overall"], overall), *((summary["by_source"][k], by_source[k]) for k in by_source)]
    for got, want in pairs:
        assert got["tokens"] == want["tokens"]
        assert got["token_accuracy"] == pytest.approx(want["token_accuracy"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert 0.2 < overall["token_accuracy"] < 0.5


def test_trained_token_without_source_is_an_error():
    totals = TokenTotals.zeros(1)
    with pytest.raises(ValueError, match="no source"):
        totals.add(torch.zeros(2, 4), torch.tensor([1, 2]), torch.tensor([0, -1]))


class _ToyDataset:
    """Two packed rows in the dataset contract's layout."""

    sources = ["a", "b"]

    def __init__(self, generator):
        self.rows = []
        for _ in range(3):
            ids = torch.randint(0, 11, (9,), generator=generator)
            labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
            labels[:2] = IGNORE_INDEX
            self.rows.append(
                {
                    "input_ids": ids,
                    "labels": labels,
                    "position_ids": torch.arange(9),
                    "document_ids": torch.zeros(9, dtype=torch.long),
                    "source_ids": torch.tensor([0] * 5 + [1] * 4),
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _Bigram(torch.nn.Module):
    """The two methods of LlamaModel that evaluation uses: hidden states, then logits."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.head = torch.nn.Linear(5, 11)
        self.seen = []
        self.logit_rows = []

    def hidden_states(self, input_ids, position_ids=None, document_ids=None):
        self.seen.append(input_ids.shape)
        return self.embed(input_ids)

    def logits(self, hidden):
        self.logit_rows.append(hidden.shape[0])
        return self.head(hidden)

    def forward(self, input_ids):
        return self.logits(self.embed(input_ids))


@pytest.mark.parametrize("chunk", [4, 2048])
def test_validation_metrics_batches_rows_and_respects_max_rows(monkeypatch, chunk):
    monkeypatch.setattr(evaluate, "CE_CHUNK_TOKENS", chunk)
    generator = torch.Generator().manual_seed(1)
    dataset, model = _ToyDataset(generator), _Bigram()
    result = evaluate.validation_metrics(model, dataset, batch_size=2, max_rows=3)
    assert model.seen == [torch.Size([2, 9]), torch.Size([1, 9])]
    assert max(model.logit_rows) <= chunk and sum(model.logit_rows) == 3 * 6  # trained positions only
    with torch.no_grad():
        logits = torch.stack([model(r["input_ids"]) for r in dataset.rows])
    overall, by_source = _reference(
        logits,
        torch.stack([r["labels"] for r in dataset.rows]),
        torch.stack([r["source_ids"] for r in dataset.rows]),
        dataset.sources,
    )
    assert result["overall"]["loss"] == pytest.approx(overall["loss"], rel=1e-6)
    assert result["by_source"]["b"]["tokens"] == by_source["b"]["tokens"] == 9
    assert result["rows"] == 3
    assert evaluate.validation_metrics(model, dataset, batch_size=2, max_rows=1)["rows"] == 1


def test_spread_rows_cover_the_split_evenly():
    assert evaluate.spread_rows(10, None) == list(range(10))
    assert evaluate.spread_rows(10, 20) == list(range(10))
    assert evaluate.spread_rows(10, 3) == [0, 3, 6]
    assert evaluate.spread_rows(1000, 4) == [0, 250, 500, 750]
