"""What ``ds-sft eval`` measures on one model: val metrics per source, GSM8K, fixed-prompt answers.

Validation. The val split is the packed rows ``prepare`` wrote; the metrics per source (loss,
perplexity, next-token accuracy, token counts) come from the evaluator the trainer uses too
(:mod:`ds_sft.model.scoring`), on every row or on the stratified sample of ``--val_rows`` rows
(:mod:`ds_sft.data.val_sample`), so a trainer's eval and ``ds-sft eval`` agree on the same rows.

Generation. GSM8K questions and the fixed prompts are rendered with the data dir's template and
tokenizer (:class:`EvalData`), exactly as ``prepare`` rendered training prompts, and answered
greedily with the KV cache until EOS or the template's end-of-turn token (or, for the Alpaca
template, until the model starts inventing a new "### Instruction:" turn).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds_sft.errors import UserError


def validation_metrics(model, dataset, batch_size: int, max_rows: int | None = None) -> dict:
    """Per-source and overall loss / perplexity / accuracy of ``model`` on a ``PackedDataset``:
    every row, or the stratified sample of ``max_rows``."""
    import torch
    from tqdm import tqdm

    from ds_sft.data.val_sample import scored_val_rows
    from ds_sft.model.generate import non_finite_logits
    from ds_sft.model.scoring import score_rows, summarize

    device = next(model.parameters()).device
    remedy = "prepare the data again, or pass --no_val"
    rows = scored_val_rows(dataset, max_rows, str(dataset.data_dir), remedy)
    model.eval()
    with tqdm(total=len(rows), desc="val", unit="row") as progress:
        totals = score_rows(model, dataset, rows, batch_size, device, scored=progress.update)
    if not bool(torch.isfinite(totals).all()):  # a NaN loss and perplexity reported with exit 0
        raise UserError(non_finite_logits(model))
    return {**summarize(totals, list(dataset.sources)), "rows": len(rows)}


# Where an Alpaca-format completion has run on into a new, invented turn.
ALPACA_STOP_STRINGS = ("### Instruction:", "### Input:", "### Response:")


@dataclass
class EvalData:
    """What a prepared data dir fixes for evaluation: the val split, the tokenizer, the template."""

    data_dir: Path
    template: str
    tokenizer: object
    val: object | None  # a PackedDataset, or None when the val pass is skipped
    # record -> its prompt's token ids: each prompt is tokenized once per eval, though
    # check_generation_fits and then the generation of each model read it
    _prompt_ids: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, data_dir: Path, need_val: bool) -> EvalData:
        from ds_sft.data.model_match import data_tokenizer_identity
        from ds_sft.data.shards import PackedDataset, read_manifest
        from ds_sft.data.tokenizer import load_tokenizer

        manifest = read_manifest(data_dir, {"template": str})
        val = PackedDataset(data_dir, "val") if need_val else None
        if val is not None and len(val) == 0:
            raise UserError(
                f"{data_dir} has an empty val split: re-run prepare with --val_fraction > 0, or --no_val"
            )
        data_tokenizer_identity(str(data_dir))  # the folder is the one the shards were made with
        if not (data_dir / "tokenizer").is_dir():
            raise UserError(
                f"{data_dir} has no tokenizer/ folder: eval tokenizes its prompts with the data's own "
                "tokenizer; run `ds-sft prepare` again for this folder"
            )
        return cls(data_dir, manifest["template"], load_tokenizer(str(data_dir / "tokenizer")), val)

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids of ``record``'s prompt, exactly as ``prepare`` tokenized training prompts."""
        from ds_sft.data.templates import render_prompt
        from ds_sft.data.tokenize import first_text_ids

        key = json.dumps(record, sort_keys=True)  # every field the template may render
        if key not in self._prompt_ids:
            text = render_prompt(record, self.template, self.tokenizer)
            self._prompt_ids[key] = first_text_ids(self.tokenizer, [text], self.template)[0]
        return list(self._prompt_ids[key])

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ALPACA_STOP_STRINGS if self.template == "alpaca" else ()

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end an answer: EOS, and the token training ended answers with
        (``ds_sft.data.templates.answer_end_id``: with a chat template, its end-of-turn token)."""
        from ds_sft.data.templates import answer_end_id

        eos, end = self.tokenizer.eos_token_id, answer_end_id(self.tokenizer, self.template)
        return [eos] if end == eos else [eos, end]


@dataclass(frozen=True)
class Completion:
    text: str  # cut at any stop string, stripped
    hit_max_new_tokens: bool  # ran out of tokens before EOS / end of turn / a stop string


def complete(
    model, data: EvalData, records: list[dict], max_new_tokens: int, repetition_penalty: float = 1.0
) -> list[Completion]:
    """Greedy completions of ``records`` (one batch), as text cut at any stop string."""
    from ds_sft.data.tokenizer import pad_id
    from ds_sft.model.generate import cut_at_stop_string, generate

    tokenizer = data.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    outputs = generate(
        model,
        [data.prompt_ids(record) for record in records],
        max_new_tokens=max_new_tokens,
        eos_ids=data.stop_ids,
        stop_strings=data.stop_strings,
        decode=decode,
        pad_id=pad_id(tokenizer),
        repetition_penalty=repetition_penalty,
    )
    completions = []
    for ids in outputs:
        text = decode(ids)
        cut = cut_at_stop_string(text, data.stop_strings)
        # a stop token ends a row without being returned, so only a full-length row can have run out
        completions.append(Completion(cut.strip(), len(ids) >= max_new_tokens and cut == text))
    return completions


def refuse_prompts_too_long_to_tokenize(data: EvalData, records: list[dict], max_seq_len: int) -> None:
    """One line for a problem whose text alone is certainly longer than ``max_seq_len`` tokens
    (:class:`ds_sft.data.tokenize.LengthFloor`), found without tokenizing it: a 200 MB question in
    --gsm8k_test was tokenized whole (228 s, 14 GB) only to be refused for its length."""
    from ds_sft.data.templates import render_prompt
    from ds_sft.data.tokenize import LengthFloor

    floor = LengthFloor(data.tokenizer.backend_tokenizer, max_seq_len)
    for record in records:
        if not floor.may_not_fit(sum(len(value) for value in record.values() if isinstance(value, str))):
            continue
        least = floor.tokens_at_least(render_prompt(record, data.template, data.tokenizer))
        if least >= max_seq_len:
            raise UserError(
                f"a problem to answer has at least {least:,} tokens (from the length of its text), past the "
                f"model's max_seq_len {max_seq_len}: shorten or remove it (it starts "
                f"{str(record.get('instruction', ''))[:60]!r})"
            )


def check_generation_fits(model, data: EvalData, records: list[dict], max_new_tokens: int, batch_size: int):
    """One line before any measuring when generation cannot run: its longest prompt plus
    ``max_new_tokens`` past the model's ``max_seq_len`` (the generator refused that only at the
    batch holding it, after the val pass and every shorter answer: minutes lost), or a batch's KV
    cache and prefill larger than the memory free for them (a traceback from the allocator, or the
    OOM killer)."""
    from ds_sft.machine import free_memory
    from ds_sft.model.generate import PREFILL_CHUNK

    if not records:
        return
    config = model.config
    refuse_prompts_too_long_to_tokenize(data, records, config.max_seq_len)
    width = max(len(data.prompt_ids(record)) for record in records)
    if width >= config.max_seq_len:
        raise UserError(
            f"a prompt to answer has {width:,} tokens, as many as the model's max_seq_len "
            f"{config.max_seq_len} or more, leaving no room for an answer: pass --no_gsm8k and --no_generate "
            "(the GSM8K problems and the fixed prompts), or shorten the problems of --gsm8k_test"
        )
    if width + max_new_tokens > config.max_seq_len:
        raise UserError(
            f"the longest prompt to answer ({width} tokens) + --max_new_tokens {max_new_tokens} exceeds the "
            f"model's max_seq_len {config.max_seq_len}: lower --max_new_tokens"
        )
    rows, length = min(batch_size, len(records)), width + max_new_tokens
    itemsize = model.wte.weight.element_size()
    cache = 2 * config.n_layers * rows * config.n_kv_heads * length * config.head_dim * itemsize
    # a prefill forward's mask and fp32 attention scores: a chunk of queries against every key
    prefill = rows * min(PREFILL_CHUNK, width) * length * (1 + 4 * config.n_heads)
    free, where = free_memory(next(model.parameters()).device)
    if free is not None and cache + prefill > free:
        raise UserError(
            f"a batch of {rows} answers keeps {cache / 2**30:,.1f} GiB of keys and values and fills them "
            f"with {prefill / 2**30:,.1f} GiB of attention scores ({width} + {max_new_tokens} tokens each), "
            f"more than the {free / 2**30:,.1f} GiB {where}: lower --generate_batch_size or --max_new_tokens"
        )


def val_forward_bytes(config, seq_len: int, itemsize: int, device) -> tuple[int, int]:
    """(bytes per val row, bytes whatever the batch) of a val forward's peak, an upper bound: one
    layer's activations live at a time (the residual and its norm, q/k/v and k/v widened to every
    head, the MLP's gate, up and product); on the CPU the attention's tiles
    (:mod:`ds_sft.model.attention`, at their largest for a row of one document: every query tile's
    key/value window gathered at once, their masks, one bucket's scores and probabilities; on CUDA
    flex_attention keeps none of these); and the fp32 logits of one chunk of trained positions
    (:data:`ds_sft.model.scoring.SCORE_CHUNK_TOKENS`)."""
    from ds_sft.model.attention import TILE
    from ds_sft.model.scoring import SCORE_CHUNK_TOKENS

    heads, kv_heads, head_dim, tokens = config.n_heads, config.n_kv_heads, config.head_dim, seq_len
    widths = 4 * config.d_model + (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim
    per_row = tokens * (widths + 3 * config.ffn_hidden) * itemsize
    if device.type == "cpu":
        windows = heads * head_dim * tokens * (tokens // TILE + 2) * itemsize  # keys and values
        masks = tokens * (tokens + 2 * TILE) // 2
        tiles = heads * tokens * (4 * TILE + 5 * head_dim) * itemsize  # scores, probs; q/k/v tiles, output
        per_row += windows + masks + tiles
    # the chunk's logits in the model's dtype, in fp32, and cross-entropy's softmax and argmax
    return per_row, SCORE_CHUNK_TOKENS * config.vocab_size * (itemsize + 3 * 4)


def check_val_fits(model, val, batch_size: int, val_rows: int | None) -> None:
    """One line before any measuring when a val forward of ``batch_size`` rows needs more memory than
    is free for it (:func:`val_forward_bytes`), as generation is checked (:func:`check_generation_fits`):
    --batch_size 4096 of 1,024-token rows was the OOM killer or an allocator traceback after the
    model had loaded. Names the largest batch that fits."""
    from ds_sft.machine import free_memory

    rows = min(batch_size, len(val), val_rows or batch_size)
    device = next(model.parameters()).device
    per_row, fixed = val_forward_bytes(model.config, val.seq_len, model.wte.weight.element_size(), device)
    free, where = free_memory(device)
    if free is None or rows * per_row + fixed <= free:
        return
    fits = max(0, (free - fixed) // per_row)
    fix = f"pass --batch_size {fits} or less" if fits else "free memory, or evaluate with --no_val"
    need = (rows * per_row + fixed) / 2**30
    raise UserError(
        f"a val forward of {rows} rows of {val.seq_len} tokens needs about {need:,.1f} GiB, more than the "
        f"{free / 2**30:,.1f} GiB {where}: {fix}"
    )


def load_checked_model(
    spec: str,
    data: EvalData,
    problems: list,
    *,
    device,
    dtype,
    generate_batch_size: int,
    max_new_tokens: int,
    run_generations: bool,
    batch_size: int = 1,
    val_rows: int | None = None,
    path: Path | None = None,
):
    """``spec`` loaded, once it is known to take the data dir's rows, its val batches and every prompt
    to answer (:func:`ds_sft.data.model_match.check_model_fits`, :func:`check_val_fits`,
    :func:`check_generation_fits`): a refusal comes before anything is measured. ``path``: ``spec``
    resolved already (:func:`ds_sft.model_source.resolve_model_path`), else resolved here."""
    from ds_sft.data.model_match import check_model_fits
    from ds_sft.eval.prompts import FIXED_PROMPTS
    from ds_sft.model.checkpoint import load_model

    model = load_model(spec, dtype=dtype, device=device, path=path).eval()
    check_model_fits(spec, model.config, data.data_dir, data.val.seq_len if data.val is not None else None)
    if data.val is not None:
        check_val_fits(model, data.val, batch_size, val_rows)
    to_answer = [{"instruction": problem.question, "input": ""} for problem in problems]
    to_answer += [prompt.as_record() for prompt in FIXED_PROMPTS] if run_generations else []
    check_generation_fits(model, data, to_answer, max_new_tokens, generate_batch_size)
    return model


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
    repetition_penalty: float = 1.0,
    harness: dict | None = None,
    path: Path | None = None,
) -> dict:
    """Everything ``ds-sft eval`` measures for one model: val metrics, GSM8K, fixed-prompt answers,
    and with ``harness`` (``{"label", "configs", "doc_ids"}``: task configs and the test-file rows of
    ``problems``) the lm-evaluation-harness on the same model and its cross-check against GSM8K.
    ``path``: as for :func:`load_checked_model`."""
    from tqdm import tqdm

    from ds_sft.eval import gsm8k
    from ds_sft.eval.prompts import FIXED_PROMPTS
    from ds_sft.eval.stats import accuracy_summary

    seconds = {}
    start = time.perf_counter()
    model = load_checked_model(
        spec, data, problems, device=device, dtype=dtype, generate_batch_size=generate_batch_size,
        max_new_tokens=max_new_tokens, run_generations=run_generations, batch_size=batch_size,
        val_rows=val_rows, path=path,
    )  # fmt: skip
    seconds["load"] = time.perf_counter() - start
    result = {"parameters": model.num_parameters(), "val": None, "gsm8k": None, "generations": None}

    if run_val:
        start = time.perf_counter()
        result["val"] = validation_metrics(model, data.val, batch_size, val_rows)
        seconds["val"] = time.perf_counter() - start

    if problems:
        start = time.perf_counter()

        def answer(questions: list[str]) -> list[tuple[str, bool]]:
            records = [{"instruction": q, "input": ""} for q in questions]
            return [
                (c.text, c.hit_max_new_tokens)
                for c in complete(model, data, records, max_new_tokens, repetition_penalty)
            ]

        score = gsm8k.score(problems, answer, generate_batch_size)
        result["gsm8k"] = {
            **accuracy_summary(score.correct, score.total),
            "hit_max_new_tokens": sum(sample["hit_max_new_tokens"] for sample in score.samples),
            "samples": score.samples,
        }
        seconds["gsm8k"] = time.perf_counter() - start

    if run_generations:
        start = time.perf_counter()
        records = [prompt.as_record() for prompt in FIXED_PROMPTS]
        completions = []
        with tqdm(total=len(records), desc="fixed prompts", unit="prompt") as progress:
            for first in range(0, len(records), generate_batch_size):
                batch = records[first : first + generate_batch_size]
                completions += complete(model, data, batch, max_new_tokens, repetition_penalty)
                progress.update(len(batch))
        result["generations"] = [
            {
                "name": p.name,
                "category": p.category,
                "prompt": _user_text(p),
                "completion": c.text,
                "hit_max_new_tokens": c.hit_max_new_tokens,
            }
            for p, c in zip(FIXED_PROMPTS, completions, strict=True)
        ]
        seconds["generations"] = time.perf_counter() - start

    if harness:
        from ds_sft.eval.harness import cross_check, harness_scores, run_harness

        start = time.perf_counter()
        gsm8k_task = any(config["task"] == "gsm8k" for config in harness["configs"])
        output = run_harness(
            model,
            data.tokenizer,
            harness["configs"],
            samples={"gsm8k": harness["doc_ids"]} if gsm8k_task else None,
            chat_template=data.template == "chat",
            batch_size=generate_batch_size,
            device=device,
        )
        result["harness"] = {
            "version": output["version"],
            "results": output["results"],
            "scores": harness_scores(harness["label"], output),
            "cross_check": (
                cross_check(
                    harness["label"],
                    result["gsm8k"]["samples"],
                    harness["doc_ids"],
                    output["samples"]["gsm8k"],
                )
                if gsm8k_task and result["gsm8k"]
                else []
            ),
            "samples": output["samples"],
        }
        seconds["harness"] = time.perf_counter() - start

    result["seconds"] = {name: round(value, 1) for name, value in seconds.items()}
    return result


def _user_text(prompt) -> str:
    return f"{prompt.instruction}\n\n{prompt.input}" if prompt.input else prompt.instruction
