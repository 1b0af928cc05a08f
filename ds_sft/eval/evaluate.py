"""What ``ds-sft eval`` measures on one model: val metrics per source, GSM8K, fixed-prompt answers.

Validation. The val split is the packed rows ``prepare`` wrote: each row holds several documents,
each token knows its source (``source_ids``) and its target (``labels``, already shifted, ``-100``
where nothing is trained). The model's own loss is one sum over all sources, so here the final
hidden states come back and the cross-entropy of every trained token is computed in fp32 and summed
into per-source buckets:

    loss(s)       = sum of -log p(label) over trained tokens of source s / their count
    perplexity(s) = exp(loss(s))
    accuracy(s)   = share of those tokens where argmax(logits) == label

"overall" pools every trained token, so it weighs sources by their tokens (like training does),
not by a plain mean over sources. Logits are made only for trained positions, a few thousand at a
time: fp32 logits of a whole batch at a 49k-50k vocabulary would be gigabytes.

Generation. GSM8K questions and the fixed prompts are rendered with the data dir's template and
tokenizer (:class:`EvalData`), exactly as ``prepare`` rendered training prompts, and answered
greedily with the KV cache until EOS (or, for the Alpaca template, until the model starts inventing
a new "### Instruction:" turn).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_sft.errors import UserError

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


def spread_rows(total: int, count: int | None) -> list[int]:
    """``count`` row indices spread evenly over ``range(total)`` (all of them when ``count`` is None).

    Packing places long documents first, so the first rows alone would be a biased sample.
    """
    if count is None or count >= total:
        return list(range(total))
    return [i * total // count for i in range(count)]


@torch.no_grad()
def validation_metrics(model, dataset, batch_size: int, max_rows: int | None = None) -> dict:
    """Per-source and overall loss / perplexity / accuracy of ``model`` on a ``PackedDataset``."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    rows = spread_rows(len(dataset), max_rows)
    totals = TokenTotals.zeros(len(dataset.sources))
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc="val", unit="batch"):
        items = [dataset[i] for i in rows[start : start + batch_size]]
        batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
        hidden = model.hidden_states(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )
        trained = batch["labels"] != IGNORE_INDEX
        hidden, labels, sources = hidden[trained], batch["labels"][trained], batch["source_ids"][trained]
        for chunk in range(0, labels.numel(), CE_CHUNK_TOKENS):
            window = slice(chunk, chunk + CE_CHUNK_TOKENS)
            totals.add(model.logits(hidden[window]), labels[window], sources[window])
    return {**totals.summary(list(dataset.sources)), "rows": len(rows)}


# Where an Alpaca-format completion has run on into a new, invented turn.
ALPACA_STOP_STRINGS = ("### Instruction:", "### Input:", "### Response:")


@dataclass
class EvalData:
    """What a prepared data dir fixes for evaluation: the val split, the tokenizer, the template."""

    data_dir: Path
    template: str
    tokenizer: object
    val: object | None  # a PackedDataset, or None when the val pass is skipped

    @classmethod
    def open(cls, data_dir: Path, need_val: bool) -> EvalData:
        from ds_sft.data.shards import PackedDataset
        from ds_sft.data.tokenizer import load_tokenizer

        manifest_path = data_dir / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{data_dir} has no manifest.json: pass a dir written by `ds-sft prepare`")
        manifest = json.loads(manifest_path.read_text())
        val = PackedDataset(data_dir, "val") if need_val else None
        if val is not None and len(val) == 0:
            raise UserError(
                f"{data_dir} has an empty val split: re-run prepare with --val_fraction > 0, or --no_val"
            )
        return cls(data_dir, manifest["template"], load_tokenizer(str(data_dir)), val)

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids of ``record``'s prompt, exactly as ``prepare`` tokenized training prompts."""
        from ds_sft.data.templates import render_prompt

        text = render_prompt(record, self.template, self.tokenizer)
        # An Alpaca prompt takes the tokenizer's post-processor (BOS where it wants one); a chat
        # template already writes its special tokens into the text (ds_sft.data.tokenize).
        encoding = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=self.template == "alpaca")
        return encoding.ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ALPACA_STOP_STRINGS if self.template == "alpaca" else ()


def complete(model, data: EvalData, records: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy completions of ``records`` (one batch), as text cut at any stop string."""
    from ds_sft.model.generate import cut_at_stop_string, generate

    tokenizer = data.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    outputs = generate(
        model,
        [data.prompt_ids(record) for record in records],
        max_new_tokens=max_new_tokens,
        eos_ids=[tokenizer.eos_token_id],
        stop_strings=data.stop_strings,
        decode=decode,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return [cut_at_stop_string(decode(ids), data.stop_strings).strip() for ids in outputs]


def evaluate_model(
    spec: str,
    data: EvalData,
    problems: list,
    *,
    device,
    dtype,
    batch_size: int,
    generate_batch_size: int,
    max_new_tokens: int,
    val_rows: int | None,
    run_val: bool,
    run_generations: bool,
) -> dict:
    """Everything ``ds-sft eval`` measures for one model: val metrics, GSM8K, fixed-prompt answers."""
    from ds_sft.data.model_match import check_model_fits
    from ds_sft.eval import gsm8k
    from ds_sft.eval.prompts import FIXED_PROMPTS
    from ds_sft.model.checkpoint import load_model

    seconds = {}
    start = time.perf_counter()
    model = load_model(spec, dtype=dtype, device=device).eval()
    check_model_fits(spec, model.config, data.data_dir, data.val.seq_len if data.val is not None else None)
    seconds["load"] = time.perf_counter() - start
    result = {"parameters": model.num_parameters(), "val": None, "gsm8k": None, "generations": None}

    if run_val:
        start = time.perf_counter()
        result["val"] = validation_metrics(model, data.val, batch_size, val_rows)
        seconds["val"] = time.perf_counter() - start

    if problems:
        start = time.perf_counter()

        def answer(questions: list[str]) -> list[str]:
            return complete(model, data, [{"instruction": q, "input": ""} for q in questions], max_new_tokens)

        score = gsm8k.score(problems, answer, generate_batch_size)
        result["gsm8k"] = {
            "accuracy": score.accuracy,
            "correct": score.correct,
            "total": score.total,
            "samples": score.samples,
        }
        seconds["gsm8k"] = time.perf_counter() - start

    if run_generations:
        start = time.perf_counter()
        records = [prompt.as_record() for prompt in FIXED_PROMPTS]
        texts = []
        for first in range(0, len(records), generate_batch_size):
            texts += complete(model, data, records[first : first + generate_batch_size], max_new_tokens)
        result["generations"] = [
            {"name": p.name, "category": p.category, "prompt": _user_text(p), "completion": text}
            for p, text in zip(FIXED_PROMPTS, texts, strict=True)
        ]
        seconds["generations"] = time.perf_counter() - start

    result["seconds"] = {name: round(value, 1) for name, value in seconds.items()}
    return result


def _user_text(prompt) -> str:
    return f"{prompt.instruction}\n\n{prompt.input}" if prompt.input else prompt.instruction
