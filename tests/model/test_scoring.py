"""The one evaluator (ds_sft.model.scoring) against a plain loop over tokens: per-token scores from
the model's forward, per-source sums, the summary, and the row loop with padding forwards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ds_sft.labels import IGNORE_INDEX
from ds_sft.model import scoring
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel

SOURCES = ["alpaca", "dolly", "gsm8k", "unused"]


def reference(logits, labels, source_ids, sources):
    """Token by token: the definition, no vectorisation. Returns (overall, by_source) metrics."""
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


def assert_matches(summary, overall, by_source, rel=1e-6):
    assert summary["by_source"].keys() == by_source.keys()
    pairs = [(summary["overall"], overall), *((summary["by_source"][k], by_source[k]) for k in by_source)]
    for got, want in pairs:
        assert got["tokens"] == want["tokens"]
        assert got["token_accuracy"] == pytest.approx(want["token_accuracy"])
        assert got["loss"] == pytest.approx(want["loss"], rel=rel)
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=rel)


def _labels_and_sources(generator, batch, seq, vocab, n_sources=3):
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    source_ids = torch.randint(0, n_sources, (batch, seq), generator=generator)
    untrained = torch.rand(batch, seq, generator=generator) < 0.3
    labels[untrained] = IGNORE_INDEX
    source_ids[(torch.rand(batch, seq, generator=generator) < 0.5) & untrained] = -1  # padding
    return labels, source_ids


@pytest.mark.parametrize("chunk", [1, 5, 2048])
def test_token_scores_and_totals_match_token_by_token_reference(chunk):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 8, generator=generator)
    weight = torch.randn(23, 8, generator=generator)
    labels, source_ids = _labels_and_sources(generator, 3, 37, 23)
    # make about a quarter of the predictions right so accuracy is not ~1/vocab
    hit = (torch.rand(3, 37, generator=generator) < 0.25) & (labels != IGNORE_INDEX)
    hidden[hit] = hidden[hit] + 10 * weight[labels[hit]]
    logits = hidden @ weight.T

    losses, hits = scoring.token_scores(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), labels, chunk)
    trained = labels != IGNORE_INDEX
    totals = scoring.source_totals(losses, hits, source_ids[trained], len(SOURCES))
    summary = scoring.summarize(totals, SOURCES)

    bf16_logits = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float()
    overall, by_source = reference(bf16_logits, labels, source_ids, SOURCES)
    assert "unused" not in summary["by_source"]
    assert_matches(summary, overall, by_source, rel=1e-5)
    assert 0.2 < overall["token_accuracy"] < 0.6
    assert reference(logits, labels, source_ids, SOURCES)[0]["tokens"] == int(trained.sum())


def test_trained_token_without_source_is_an_error():
    with pytest.raises(ValueError, match="no source"):
        scoring.source_totals(torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.tensor([0, -1]), 1)


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no trained tokens"):
        scoring.summarize(torch.zeros(2, 3, dtype=torch.float64), ["a", "b"])


class Rows:
    """Packed rows of 1-3 documents in the dataset contract's layout (dict of 1-D tensors)."""

    sources = ["a", "b", "c"]

    def __init__(self, count: int, seq: int, vocab: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(count):
            labels, source_ids = _labels_and_sources(generator, 1, seq, vocab)
            documents = torch.zeros(seq, dtype=torch.long)
            documents[seq // 2 :] = 1
            positions = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])
            source_ids[0][source_ids[0] < 0] = 0
            self.rows.append(
                {
                    "input_ids": torch.randint(0, vocab, (seq,), generator=generator),
                    "labels": labels[0],
                    "position_ids": positions,
                    "document_ids": documents,
                    "source_ids": source_ids[0],
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _tiny_model():
    torch.manual_seed(0)
    return LlamaModel(ModelConfig.preset("tiny", kernels="torch")).eval()


@pytest.mark.parametrize(
    ("rows", "batch_size", "forwards"), [([0, 1, 2, 3, 4], 2, None), ([3], 4, 3), ([], 2, 2)]
)
def test_score_rows_through_the_model_forward(rows, batch_size, forwards, monkeypatch):
    """Rows scored through ``model(..., scores=True)`` equal the token loop over full logits of the
    same forward; padding forwards (``forwards`` beyond the rows) run but are not counted."""
    model = _tiny_model()
    dataset = Rows(5, 24, model.config.vocab_size, seed=1)
    calls = []
    original = model.forward
    monkeypatch.setattr(
        model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or original(*a, **k)
    )
    totals = scoring.score_rows(model, dataset, rows, batch_size, torch.device("cpu"), forwards=forwards)
    assert len(calls) == max(math.ceil(len(rows) / batch_size), forwards or 0)
    if not rows:
        assert totals.sum() == 0
        return
    with torch.no_grad():
        batch = {k: torch.stack([dataset[i][k] for i in rows]) for k in dataset[0]}
        logits = original(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    overall, by_source = reference(logits, batch["labels"], batch["source_ids"], dataset.sources)
    assert_matches(scoring.summarize(totals, dataset.sources), overall, by_source, rel=1e-5)
