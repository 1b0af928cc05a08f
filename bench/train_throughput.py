"""Is ds-sft's training step fast? Three ratios, each measured side by side in one process.

    python bench/train_throughput.py                  # 112m preset, seq 512 x 4, bf16
    python bench/train_throughput.py --quick          # tiny sizes: a smoke test, not a measurement
    python bench/train_throughput.py --parts a,c --preset smollm2-135m --steps 8

(a) Step speed against peers. The ds-sft step (the trainer's DeepSpeed engine and step function,
    ``ds_configs/zero2.json`` with bf16, packed rows with document-isolated attention) against
    ``transformers.LlamaForCausalLM`` of the same config in a plain PyTorch AdamW loop under bf16
    autocast, on the same token rows, with torch's fused AdamW (what the Hugging Face Trainer uses
    by default since torch 2.8). A third row runs the ds-sft model in that same plain loop, which
    separates "the model is faster" from "the engine costs something". The contenders take turns
    step by step (A B C A B C ...), so a neighbour stealing the CPU for a while slows all of them
    alike; the figure is the median step.

(b) Packing against padding, in *trained* tokens per second (tokens whose loss counts). The same
    documents are laid out three ways and trained on with the ds-sft model: packed rows (what
    ``prepare`` writes), one document per row padded to ``seq_len`` (DeepSpeed-Chat), and micro-
    batches padded to their longest document (Hugging Face's collator; for the ds-sft model on CUDA
    rounded up to flex_attention's 128-token block, so that it compiles for a few shapes, which the
    warm-up compiles before any step is timed). The ds-sft model skips most
    of padding's cost (no LM head on untrained tokens, no attention tiles made only of padding), so
    within ds-sft padding costs less than the token efficiency says; the two padded layouts are also
    trained by ``transformers.LlamaForCausalLM``, as the frameworks that pad run them (logits and
    attention for every slot). The documents come from a prepared data dir (``--data_dir``), else a
    synthetic mix with the shared mix's length profile (flagged in the JSON).

(c) How close to the machine the step runs: achieved FLOP/s of the ds-sft step, counting
    ``6 N + 12 L d T`` FLOPs per token (forward + backward of every weight, plus attention scores
    and values over a context of T), divided by the FLOP/s of one large bf16 matrix multiply (the
    practical ceiling of these cores). That is the usual MFU count; ds-sft does less work than it
    charges (no LM head on prompt tokens, no attention across documents), so a second line counts
    only the work no step can avoid (:func:`useful_flops`). The multiply takes its turn in the same
    round robin as the steps, so both see the same neighbours. On a GPU the step is also divided by
    the device's datasheet bf16 peak: the MFU that papers quote.

Prints a table and writes ``bench/results/train_throughput[.quick].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from ds_sft.bench_result import check_bench_out, processor_name, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.data.pack import best_fit_decreasing  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.eval.cli import available_device  # noqa: E402
from ds_sft.labels import IGNORE_INDEX  # noqa: E402
from ds_sft.model.config import KERNEL_BACKENDS, PRESETS, ModelConfig  # noqa: E402
from ds_sft.model.fp8 import MODES as FP8_MODES  # noqa: E402
from ds_sft.model.llama import LlamaModel, use_flex_attention  # noqa: E402
from ds_sft.options import COUNT, INT32_MAX, SEED, Choice, Device, Int, Names, Text  # noqa: E402
from ds_sft.train.metrics import datasheet_peak, flops_per_token  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SEQ_LEN = Int(8, 2**20)  # tokens per row, as `ds-sft prepare --seq_len`
FLEX_BLOCK = 128  # flex_attention's block of queries and keys (its BlockMask's default BLOCK_SIZE)

# Document lengths of the shared mix with the GPT-2 tokenizer (FACTS.md: mean 191, p95 410, max
# 3,078 tokens, 54% of them response tokens), for when no prepared data dir is given. Lengths are
# scaled by seq_len / 1024 so that a short --quick row sees the same packing problem.
SYNTHETIC_MEAN_TOKENS, SYNTHETIC_SIGMA, SYNTHETIC_RESPONSE_SHARE = 191, 0.65, 0.54


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes for CI: checks it runs, measures nothing"
    )
    parser.add_argument(
        "--parts",
        type=Names("a", "b", "c"),
        default=["a", "b", "c"],
        help="comma-separated parts to run: a, b, c",
    )
    parser.add_argument(
        "--preset",
        type=Choice(*PRESETS),
        default="112m",
        help="model preset for (a) and (c) (ds_sft.model.config)",
    )
    parser.add_argument("--seq_len", type=SEQ_LEN, default=512, help="row length for (a) and (c)")
    parser.add_argument("--micro_batch", type=Int(1, 2**16), default=4, help="rows per step")
    parser.add_argument("--steps", type=COUNT, default=5, help="measured steps per contender (after warm-up)")
    parser.add_argument(
        "--warmup", type=Int(0, INT32_MAX), default=1, help="unmeasured steps per contender first"
    )
    parser.add_argument(
        "--b_preset", type=Choice(*PRESETS), default=None, help="model preset for (b); default: --preset"
    )
    parser.add_argument("--b_seq_len", type=SEQ_LEN, default=1024, help="row length for (b)")
    parser.add_argument(
        "--b_rows", type=Int(1, 2**16), default=8, help="packed rows whose documents (b) trains on"
    )
    parser.add_argument(
        "--data_dir", type=Text(), default=None, help="a prepared data dir for (b)'s documents (train split)"
    )
    parser.add_argument(
        "--gemm_size", type=Int(1, 2**16), default=None, help="n of the n x n x n bf16 GEMM (default 4096)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add a contender: the ds-sft step under torch.compile (ds-sft train --compile); its first "
        "steps compile (~30 s on CPU), so raise --warmup",
    )
    parser.add_argument(
        "--kernels",
        type=Choice(*KERNEL_BACKENDS),
        default="auto",
        help="ds-sft kernels backend: auto, triton, torch, eager",
    )
    parser.add_argument(
        "--device", type=Device(), default=None, help="torch device; default cuda when available, else cpu"
    )
    parser.add_argument(
        "--fp8",
        type=Choice(*FP8_MODES),
        default="off",
        help="fp8 mode of the (c) step, as `ds-sft train --fp8` (default off)",
    )
    parser.add_argument(
        "--fp8_select",
        default="all",
        type=Choice("all", "auto"),
        help='which projections run in fp8, as the recipe\'s "fp8": {"select": ...}: all, or those the '
        "roofline (ds_sft/model/fp8_roofline.json) says are faster at micro_batch x seq_len tokens",
    )
    parser.add_argument(
        "--grad_accum",
        type=Int(1, 1024),
        default=1,
        help="micro-batches per update of the (c) step, as `ds-sft train --grad_accum` (the recipe: 16): "
        "the engine's per-update work (gradient norm and its inf/NaN test, AdamW) is paid once per this many",
    )
    parser.add_argument(
        "--no_overflow_check",
        action="store_true",
        help="the (c) step with DeepSpeed's bf16 check_grad_overflow off: what testing the gradient norm for "
        "inf/NaN costs (ds-sft keeps it on: it is what skips an update that is not finite)",
    )
    parser.add_argument(
        "--override",
        type=Text(),
        default=None,
        help="model config overrides KEY=VALUE,... e.g. d_model=2048,n_heads=16,ffn_hidden=5504",
    )
    parser.add_argument(
        "--profile_steps",
        type=Int(0, 1000),
        default=0,
        help="after timing (c), run this many more ds-sft steps under torch.profiler and report where "
        "their time goes: the top kernels by their own device time (on CPU, ops by own CPU time), and "
        "per phase of a step (inputs, attention mask, forward, backward, update) its host and wall time",
    )
    parser.add_argument("--seed", type=SEED, default=0, help="seed for weights, tokens and document order")
    parser.add_argument(
        "--out",
        type=Text(),
        default=None,
        help="JSON path; default bench/results/train_throughput[.quick].json",
    )
    return parser


def model_overrides(text: str | None) -> dict:
    """``--override d_model=2048,n_heads=16``: field -> value, each value JSON (numbers, true, null)."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            raise UserError(f"--override {item!r}: write FIELD=VALUE with a JSON value, e.g. d_model=2048")
    return overrides


# ----------------------------------------------------------------------------- rows of tokens


@dataclass
class Document:
    input_ids: torch.Tensor  # [n]
    labels: torch.Tensor  # [n], already shifted, -100 where nothing is trained


def synthetic_documents(
    count: int, vocab_size: int, max_len: int, generator: random.Random
) -> list[Document]:
    """Documents with the shared mix's length profile (for rows of ``max_len``): prompt, then response."""
    import math

    docs = []
    mean = SYNTHETIC_MEAN_TOKENS * max_len / 1024
    mu = math.log(mean) - SYNTHETIC_SIGMA**2 / 2  # lognormal with that mean
    for _ in range(count):
        length = max(4, min(max_len, round(generator.lognormvariate(mu, SYNTHETIC_SIGMA))))
        ids = torch.tensor([generator.randrange(vocab_size) for _ in range(length)])
        prompt = round(length * (1 - SYNTHETIC_RESPONSE_SHARE))
        labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
        labels[:prompt] = IGNORE_INDEX
        docs.append(Document(ids, labels))
    return docs


def documents_from_rows(rows: list[dict]) -> list[Document]:
    """Cut packed rows back into their documents (``document_ids`` >= 0)."""
    docs = []
    for row in rows:
        for doc in row["document_ids"].unique().tolist():
            if doc < 0:
                continue
            where = row["document_ids"] == doc
            docs.append(Document(row["input_ids"][where], row["labels"][where]))
    return docs


def pack_rows(docs: list[Document], seq_len: int) -> list[dict]:
    """Rows of ``seq_len`` packed as ``prepare`` packs (best-fit decreasing), for synthetic documents
    (real ones come packed)."""
    rows = best_fit_decreasing([len(doc.input_ids) for doc in docs], seq_len)
    return [layout_row([docs[i] for i in row], seq_len) for row in rows]


def layout_row(docs: list[Document], length: int) -> dict:
    """One row in the dataset contract's layout: documents back to back, then padding."""
    row = {
        "input_ids": torch.zeros(length, dtype=torch.long),
        "labels": torch.full((length,), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(length, dtype=torch.long),
        "document_ids": torch.full((length,), -1, dtype=torch.long),
    }
    start = 0
    for index, doc in enumerate(docs):
        end = start + len(doc.input_ids)
        row["input_ids"][start:end] = doc.input_ids
        row["labels"][start:end] = doc.labels
        row["position_ids"][start:end] = torch.arange(end - start)
        row["document_ids"][start:end] = index
        start = end
    return row


def stack(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def batches_of(rows: list[dict], size: int) -> list[dict]:
    return [stack(rows[i : i + size]) for i in range(0, len(rows), size)]


def padded_layouts(
    docs: list[Document], seq_len: int, micro_batch: int, seed: int, multiple: int = 1
) -> dict[str, list[dict]]:
    """The same documents as micro-batches: one per row padded to seq_len, or to the batch's longest
    rounded up to a ``multiple`` (at most seq_len)."""
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    pad_to_seq = batches_of([layout_row([d], seq_len) for d in shuffled], micro_batch)
    pad_to_longest = []
    for i in range(0, len(shuffled), micro_batch):
        group = shuffled[i : i + micro_batch]
        longest = min(seq_len, -(-max(len(d.input_ids) for d in group) // multiple) * multiple)
        pad_to_longest.append(stack([layout_row([d], longest) for d in group]))
    return {"pad_to_seq_len": pad_to_seq, "pad_to_longest": pad_to_longest}


def split_efficiency(dataset, micro_batch: int, seed: int) -> dict:
    """Token efficiency of the three layouts over a whole prepared split, from its document lengths."""
    import numpy as np

    lengths = []
    for i in range(len(dataset)):
        document_ids = dataset.row_arrays(i)["document_ids"]
        lengths += np.bincount(document_ids[document_ids >= 0]).tolist()
    random.Random(seed).shuffle(lengths)
    tokens = sum(lengths)
    result = {
        "documents": len(lengths),
        "packed": tokens / (len(dataset) * dataset.seq_len),
        "pad_to_seq_len": tokens / (len(lengths) * dataset.seq_len),
    }
    for batch in sorted({micro_batch, 16}):
        groups = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
        result[f"pad_to_longest_batch_{batch}"] = tokens / sum(max(g) * len(g) for g in groups)
    return result


def token_counts(batches: list[dict]) -> dict:
    slots = sum(b["input_ids"].numel() for b in batches)
    real = sum(int((b["document_ids"] >= 0).sum()) for b in batches)
    trained = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    return {
        "batches": len(batches),
        "slots": slots,
        "tokens": real,
        "trained_tokens": trained,
        "token_efficiency": real / slots,
    }


# ----------------------------------------------------------------------------- contenders


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def plain_dssft_step(config: ModelConfig, device: torch.device, lr: float = 1e-4) -> Callable[[dict], float]:
    """The ds-sft model in a plain AdamW loop under bf16 autocast."""
    model = LlamaModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step(batch: dict) -> float:
        trained = (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)
        with _autocast(device):
            loss = model(
                batch["input_ids"], batch["position_ids"], batch["document_ids"], labels=batch["labels"]
            )
        (loss / trained).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() / trained.item()

    return step


def hf_step(
    config: ModelConfig, device: torch.device, lr: float = 1e-4, rows_per_pass: int | None = None
) -> Callable[[dict], float]:
    """transformers' LlamaForCausalLM of the same shape, plain AdamW, bf16 autocast, its own loss.

    ``rows_per_pass`` splits a batch into forward/backward passes of that many rows before the one
    update (the same slots and FLOPs): its full logits would not fit in memory at 16 x 1024.
    """
    from transformers import LlamaForCausalLM

    from ds_sft.model.hf_families import hf_config

    hf_cfg = hf_config(config)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step(batch: dict) -> float:
        # HF shifts labels itself: give it the unshifted ids, masked where the ds-sft labels are.
        labels = batch["input_ids"].clone()
        labels[:, 1:][batch["labels"][:, :-1] == IGNORE_INDEX] = IGNORE_INDEX
        labels[:, 0] = IGNORE_INDEX
        trained = (labels != IGNORE_INDEX).sum().clamp(min=1)
        total = 0.0
        for rows in torch.split(torch.arange(len(labels)), rows_per_pass or len(labels)):
            with _autocast(device):
                loss = model(input_ids=batch["input_ids"][rows], labels=labels[rows]).loss
            # a pass's mean, weighted by its share of the batch's trained tokens
            loss = loss * (labels[rows] != IGNORE_INDEX).sum() / trained
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def deepspeed_step(
    config: ModelConfig,
    micro_batch: int,
    compile: bool = False,
    fp8: str = "off",
    fp8_select: str = "all",
    tokens: int | None = None,
    accumulation: int = 1,
    overflow_check: bool = True,
    reduce_every_micro_batch: bool = False,
):
    """The ds-sft training step itself: ``ds_configs/zero2.json`` with bf16 on, the trainer's engine
    (parameter groups, ``deepspeed.initialize``) and its token-normalized ``train_step``; with
    ``compile`` the engine's module goes through ``torch.compile`` as ``ds-sft train --compile`` does,
    with ``fp8`` other than off its projections (``fp8_select``: all, or those the roofline picks
    for ``tokens`` rows per micro-batch) run the fp8 matmuls of ``ds-sft train --fp8``. One step is
    one update of ``accumulation`` micro-batches (the batch it is given, that many times);
    ``overflow_check`` is DeepSpeed's bf16 ``check_grad_overflow``; ``reduce_every_micro_batch``
    steps as DeepSpeed alone would, reducing the gradients in every micro-batch (ds-sft's ZeRO 2
    reduces them once per update: ds_sft/train/engine.py)."""
    from ds_sft.safe_read import read_json_object
    from ds_sft.train.distributed import init_distributed
    from ds_sft.train.engine import build_engine
    from ds_sft.train.step import train_step

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    _, world_size = init_distributed()
    ds_config = {
        k: v for k, v in read_json_object(REPO_ROOT / "ds_configs" / "zero2.json").items() if k != "_comment"
    }
    ds_config.update(
        train_batch_size=micro_batch * accumulation * world_size,  # the file's is the recipe's 256
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_print=10**9,
    )
    ds_config["bf16"] = {"enabled": True, "check_grad_overflow": overflow_check}
    model, forward_context = LlamaModel(config), contextlib.nullcontext
    fp8_projections = "none"
    if fp8 != "off":
        from ds_sft.model.fp8 import Fp8Recipe, apply_fp8, fp8_autocast, fp8_layout, fp8_linear_names

        recipe = Fp8Recipe(select=fp8_select)
        projections = len(fp8_linear_names(model))
        apply_fp8(model, fp8, recipe, tokens=tokens, say=print)  # prints which projections run in fp8
        fp8_projections = f"{(fp8_layout(model, None) or {}).get('layers', 0)} of {projections}"
        forward_context = functools.partial(fp8_autocast, fp8, recipe)
    engine, _ = build_engine(model, ds_config, weight_decay=0.05)
    if compile:
        engine.compile()

    def step(batch: dict) -> float:
        with reduction_per_micro_batch() if reduce_every_micro_batch else contextlib.nullcontext():
            return train_step(engine, [batch] * accumulation, world_size, forward_context)["loss"]

    step.engine, step.fp8_projections, step.forward_context = engine, fp8_projections, forward_context
    return step


@contextlib.contextmanager
def reduction_per_micro_batch():
    """train_step as DeepSpeed alone steps: ZeRO 2 reduces the gradients in every micro-batch."""
    from ds_sft.train import step as ds_sft_step

    once_per_update = ds_sft_step.reduces_gradients_once_per_update
    ds_sft_step.reduces_gradients_once_per_update = lambda engine, count: False
    try:
        yield
    finally:
        ds_sft_step.reduces_gradients_once_per_update = once_per_update


PROFILE_ROWS = 15  # kernels listed by --profile_steps; the rest are summed in "other"


def profile_steps(step: Callable, batches: list[dict], device, steps: int) -> dict:
    """Where ``steps`` steps spend their time, from torch.profiler: the ops (on a GPU, the kernels)
    with the most time of their own per step, each with its share of all such time, and that total
    against the wall time per step. On a GPU the two differ by the time the device sat idle waiting
    for the host: a step far longer than its kernels is bound by launches, not by arithmetic. So on
    a GPU the host's side is ranked too (``host_top``: ops, autograd nodes and CUDA runtime calls by
    their own CPU time), to say what the device waited for."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step({k: v.to(device) for k, v in batches[i % len(batches)].items()})
        _sync(device)
        wall = time.perf_counter() - start
    events = profiler.key_averages()
    clock = ("CUDA", "self_device_time_total") if cuda else ("CPU", "self_cpu_time_total")
    top, other, busy = ranked_own_time(events, *clock, steps)
    result = {
        "steps": steps,
        "clock": "device" if cuda else "cpu",
        "wall_ms_per_step": wall * 1e3 / steps,
        "busy_ms_per_step": busy,
        "top": top,
        "other_ms_per_step": other,
    }
    if cuda:
        host_top, host_other, host_busy = ranked_own_time(events, "CPU", "self_cpu_time_total", steps)
        result.update(host_top=host_top, host_other_ms_per_step=host_other, host_busy_ms_per_step=host_busy)
    return result


def ranked_own_time(events, device_type: str, own_time: str, steps: int) -> tuple[list[dict], float, float]:
    """The :data:`PROFILE_ROWS` events of ``device_type`` with the most ``own_time`` (microseconds) per
    step, each with its calls per step and share of all; then the ms per step of the rest and of all."""
    events = [e for e in events if e.device_type.name == device_type]
    own_us = {e.key: 0.0 for e in events}
    calls = dict.fromkeys(own_us, 0)
    for e in events:
        own_us[e.key] += getattr(e, own_time)
        calls[e.key] += e.count
    total = sum(own_us.values())
    ranked = sorted(own_us, key=own_us.get, reverse=True)
    rows = [
        {
            "op": name,
            "calls_per_step": calls[name] / steps,
            "ms_per_step": own_us[name] / 1e3 / steps,
            "share": own_us[name] / total if total else 0.0,
        }
        for name in ranked[:PROFILE_ROWS]
    ]
    other = sum(own_us[name] for name in ranked[PROFILE_ROWS:])
    return rows, other / 1e3 / steps, total / 1e3 / steps


def update_after(micro_batches: contextlib.ExitStack, engine) -> None:
    """Leave the block of an update's micro-batches, then update."""
    micro_batches.close()
    engine.step()


def step_phases(step: Callable, batch: dict, device, steps: int) -> dict:
    """Each phase of ``steps`` ds-sft updates (a :func:`deepspeed_step`), timed twice: ``host_ms``,
    until the host has queued it (the call returns), and ``done_ms``, until the device has also run
    it. Where the two agree the host is the bottleneck: the device ran the kernels as fast as they
    came. ``attention mask`` is built once more on its own (the forward builds it inside: on a GPU
    the flex_attention BlockMask). Per micro-batch for all but ``update``, the engine's step at the
    end of each update (with, at ZeRO 2 over several micro-batches, the update's one gradient
    reduction); medians, after one unmeasured update."""
    from ds_sft.train.step import micro_batches_of_one_update, model_inputs

    engine = step.engine
    model = engine.module
    accumulation = engine.gradient_accumulation_steps()
    times: dict[str, list[tuple[float, float]]] = {}

    def timed(phase: str, fn: Callable, *args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        queued = time.perf_counter() - start
        _sync(device)
        times.setdefault(phase, []).append((queued, time.perf_counter() - start))
        return out

    scale = 1.0 / max(1, int((batch["labels"] != IGNORE_INDEX).sum()) * accumulation)
    for update in range(steps + 1):
        with contextlib.ExitStack() as stack:
            micro_batch_done = stack.enter_context(micro_batches_of_one_update(engine, accumulation))
            for i in range(accumulation):
                inputs = timed("inputs", model_inputs, batch, device)
                documents = inputs.get("document_ids")
                timed("attention mask", model._attention_mask, inputs["input_ids"], documents, None, None)
                with step.forward_context():
                    loss = timed("forward", engine, **inputs)
                timed("backward", engine.backward, loss * scale, scale_wrt_gas=False)
                if i < accumulation - 1:
                    micro_batch_done()
            end_of_micro_batches = stack.pop_all()  # at ZeRO 2 the update's gradient reduction
        timed("update", update_after, end_of_micro_batches, engine)
        if update == 0:  # unmeasured: the first one warms up
            times.clear()
    return {
        phase: {
            "host_ms": statistics.median(queued for queued, _ in pairs) * 1e3,
            "done_ms": statistics.median(done for _, done in pairs) * 1e3,
            "per_update": 1 if phase == "update" else accumulation,
        }
        for phase, pairs in times.items()
    }


def measure_round_robin(
    contenders: dict[str, Callable], batches: list[dict], device, warmup: int, steps: int
):
    """Median seconds per step of each contender, taking turns one step at a time."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    losses: dict[str, float] = {}
    for i in range(warmup + steps):
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        for name, step in contenders.items():
            _sync(device)
            start = time.perf_counter()
            losses[name] = step(batch)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, losses


def time_layouts(runs: dict[str, tuple[Callable, list[dict]]], device) -> dict[str, float]:
    """Total seconds for one step on every batch of each run (a step function and its batches).

    The runs have different batch counts (packing needs ~5x fewer), so their steps are spread
    evenly over the run in proportion: batch k of a run with n batches runs at (k + 1/2) / n of
    the way through. A neighbour that wakes up for a while then slows every layout alike, instead
    of landing on whichever layout happened to be running then.
    """
    # Warm-up, unmeasured: one batch per step function; on CUDA one of each shape, as flex_attention is
    # compiled for each (B, T) (padding to the longest row gives many). Past dynamo's recompile limit
    # (8 shapes) the rest would run uncompiled, timing the padded layouts on slow code: the limit is
    # raised to the shapes warmed, and a compile in a timed step is an error, not a slow step.
    warm_ups = {}
    for step, batches in runs.values():
        for batch in batches if device.type == "cuda" else batches[:1]:
            warm_ups.setdefault((step, tuple(batch["input_ids"].shape)), batch)
    limit = max(torch._dynamo.config.recompile_limit, len(warm_ups))
    with torch._dynamo.config.patch(recompile_limit=limit):
        for (step, _), batch in warm_ups.items():
            step({k: v.to(device) for k, v in batch.items()})
    schedule = sorted(
        ((k + 0.5) / len(batches), name, k)
        for name, (_, batches) in runs.items()
        for k in range(len(batches))
    )
    totals = dict.fromkeys(runs, 0.0)
    with torch._dynamo.config.patch(recompile_limit=limit, error_on_recompile=device.type == "cuda"):
        for _, name, k in schedule:
            step, batches = runs[name]
            batch = {key: value.to(device) for key, value in batches[k].items()}
            _sync(device)
            start = time.perf_counter()
            step(batch)
            _sync(device)
            totals[name] += time.perf_counter() - start
    return totals


# ----------------------------------------------------------------------------- FLOPs


def useful_flops(config: ModelConfig, batch: dict) -> float:
    """The FLOPs a step on ``batch`` cannot avoid: every weight for each real token (not padding), the
    LM head only for trained tokens, and attention only over the causal pairs inside a document.

    ``flops_per_token`` (the trainer's MFU count, 6 N + 12 L d T) charges the head to every token
    and attention to ``T`` keys per query; a step that skips prompt logits and masked-out pairs does
    less than that, so this count is the honest numerator for "how busy were the cores".
    """
    head = config.vocab_size * config.d_model
    documents = batch["document_ids"]
    real_tokens = int((documents >= 0).sum())
    trained_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    pairs = 0
    for row in documents:
        lengths = torch.bincount(row[row >= 0])
        pairs += int((lengths * (lengths + 1) // 2).sum())
    weights = 6 * (config.matmul_parameters() - head) * real_tokens + 6 * head * trained_tokens
    return weights + 12 * config.n_layers * config.n_heads * config.head_dim * pairs


GEMM = "gemm"  # the round robin's entry for the reference matrix multiply of (c)
PER_MICRO_BATCH = "reduction_per_micro_batch"  # (c)'s step as DeepSpeed alone runs it, when accumulating


def gemm_step(n: int, device: torch.device) -> Callable[[dict], float]:
    """One n x n x n bf16 matrix multiply (2 n^3 FLOPs), shaped like a contender so that it takes
    its turn between the training steps; the batch is ignored."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def step(batch: dict) -> float:
        torch.mm(a, b)
        return 0.0

    step.flops = 2 * n**3
    return step


def gpu_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its datasheet bf16 peak (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return processor_name(), None
    name = torch.cuda.get_device_name(device)
    return name, datasheet_peak(name)


# ----------------------------------------------------------------------------- parts


def gemm_size(args, device: torch.device) -> int:
    return args.gemm_size or (8192 if device.type == "cuda" else 4096)


def part_a(args, config: ModelConfig, device, batches, gemm: Callable | None) -> dict:
    """The step contenders side by side; ``gemm`` (for (c)) takes its turn with them."""
    contenders = {
        "hf_llama_adamw": hf_step(config, device),
        "dssft_model_adamw": plain_dssft_step(config, device),
        "dssft_deepspeed_zero2": deepspeed_step(config, args.micro_batch),
    }
    if args.compile:
        contenders["dssft_deepspeed_zero2_compiled"] = deepspeed_step(config, args.micro_batch, compile=True)
    seconds, losses = measure_round_robin(
        {**contenders, **({GEMM: gemm} if gemm else {})}, batches, device, args.warmup, args.steps
    )
    gemm_s = seconds.pop(GEMM, None)
    tokens = args.micro_batch * args.seq_len
    rows = {
        name: {"step_s": s, "tokens_per_s": tokens / s, "last_loss": losses[name]}
        for name, s in seconds.items()
    }
    for name, step in contenders.items():
        if name.startswith("dssft_deepspeed"):
            step.engine.destroy()
    baseline = rows["hf_llama_adamw"]["tokens_per_s"]
    return {
        "rows": rows,
        "speedup_vs_hf": {name: row["tokens_per_s"] / baseline for name, row in rows.items()},
        "tokens_per_step": tokens,
        "gemm_s": gemm_s,
        "target_speedup": 1.3,
    }


HF_SUFFIX = "_hf"  # (b): a padded layout trained by transformers' LlamaForCausalLM


def part_b(args, device) -> dict:
    preset = ModelConfig.preset(args.b_preset or args.preset, kernels=args.kernels).to_dict()
    whole_split = None
    if args.data_dir:
        from ds_sft.data.shards import PackedDataset

        dataset = PackedDataset(args.data_dir, "train")
        seq_len = dataset.seq_len
        whole_split = split_efficiency(dataset, args.micro_batch, args.seed)
        # rows spread over the split: packing puts the longest documents into the first rows
        picked = [i * len(dataset) // args.b_rows for i in range(min(args.b_rows, len(dataset)))]
        keys = ("input_ids", "labels", "position_ids", "document_ids")
        packed_rows = [{k: dataset[i][k] for k in keys} for i in picked]
        docs = documents_from_rows(packed_rows)
        origin = str(args.data_dir)
        # the data's tokenizer may outgrow the preset's vocabulary (GPT-2's 50,257 ids fit 112m's 50,304)
        largest_id = max(int(row["input_ids"].max()) for row in packed_rows)
        preset["vocab_size"] = max(preset["vocab_size"], (largest_id // 128 + 1) * 128)
    else:
        seq_len = args.b_seq_len
        docs = []
        generator = random.Random(args.seed)
        # draw documents until best-fit packing fills the requested number of rows
        while not docs or len(pack_rows(docs, seq_len)) < args.b_rows:
            docs += synthetic_documents(8, preset["vocab_size"], seq_len, generator)
        packed_rows = pack_rows(docs, seq_len)
        origin = "synthetic (no --data_dir): lognormal lengths like the shared mix"
    config = ModelConfig.from_dict({**preset, "max_seq_len": max(seq_len, preset["max_seq_len"])})
    # flex_attention compiles for each (B, T): rows a multiple of its block (computed whole anyway)
    multiple = FLEX_BLOCK if use_flex_attention(device) else 1
    layouts = {
        "packed": batches_of(packed_rows, args.micro_batch),
        **padded_layouts(docs, seq_len, args.micro_batch, args.seed, multiple),
    }

    torch.manual_seed(args.seed)
    dssft = plain_dssft_step(config, device)
    runs = {name: (dssft, batches) for name, batches in layouts.items()}
    # The padded layouts as the frameworks that use them train: Hugging Face's model computes logits
    # and attention for padding too, where the ds-sft model skips both; its collator pads to the longest.
    hf = hf_step(config, device, rows_per_pass=4)
    hf_layouts = padded_layouts(docs, seq_len, args.micro_batch, args.seed)
    runs.update({f"{name}{HF_SUFFIX}": (hf, batches) for name, batches in hf_layouts.items()})
    seconds = time_layouts(runs, device)
    results = {}
    for name, (_, batches) in runs.items():
        counts = token_counts(batches)
        results[name] = {
            **counts,
            "seconds": seconds[name],
            "trained_tokens_per_s": counts["trained_tokens"] / seconds[name],
        }
    packed = results["packed"]["trained_tokens_per_s"]
    return {
        "documents": len(docs),
        "documents_from": origin,
        "seq_len": seq_len,
        "model": args.b_preset or args.preset,
        "layouts": {name: r for name, r in results.items() if not name.endswith(HF_SUFFIX)},
        "hf_padded": {n.removesuffix(HF_SUFFIX): r for n, r in results.items() if n.endswith(HF_SUFFIX)},
        "token_efficiency_whole_split": whole_split,
        "packing_speedup": {
            name: packed / r["trained_tokens_per_s"] for name, r in results.items() if name != "packed"
        },
        "targets": {"pad_to_seq_len": 5.0, "pad_to_longest": 2.4},
    }


def part_c(args, config: ModelConfig, device, a_result: dict | None, batches) -> dict:
    """FLOP/s of the ds-sft step (compiled when ``--compile``) against the GEMM and the GPU peak."""
    name = "dssft_deepspeed_zero2_compiled" if args.compile else "dssft_deepspeed_zero2"
    gemm_n = gemm_size(args, device)
    fp8_projections = "none"
    profile = None
    # (a) measured the default bf16 step: (c) reuses it unless it was asked for another or a profile
    as_in_a = args.fp8 == "off" and args.grad_accum == 1 and not args.no_overflow_check
    vs_per_micro_batch = loss_gap = None  # against DeepSpeed's reduction in every micro-batch, if several
    if a_result is None or not as_in_a or args.profile_steps:  # the step and the GEMM take turns
        options = dict(
            compile=args.compile,
            fp8=args.fp8,
            fp8_select=args.fp8_select,
            tokens=args.micro_batch * args.seq_len,
            accumulation=args.grad_accum,
            overflow_check=not args.no_overflow_check,
        )
        torch.manual_seed(args.seed)  # a reference below starts from the same weights
        step = deepspeed_step(config, args.micro_batch, **options)
        contenders = {name: step, GEMM: gemm_step(gemm_n, device)}
        if args.grad_accum > 1:  # what reducing once per update saves, side by side
            torch.manual_seed(args.seed)
            contenders[PER_MICRO_BATCH] = deepspeed_step(
                config, args.micro_batch, **options, reduce_every_micro_batch=True
            )
        seconds, losses = measure_round_robin(contenders, batches, device, args.warmup, args.steps)
        if PER_MICRO_BATCH in contenders:
            contenders[PER_MICRO_BATCH].engine.destroy()
            vs_per_micro_batch = seconds[PER_MICRO_BATCH] / seconds[name]
            # the same weights and batches: the two must train alike (bit for bit on one CPU rank)
            loss_gap = abs(losses[name] - losses[PER_MICRO_BATCH]) / abs(losses[PER_MICRO_BATCH])
        if args.profile_steps:
            profile = profile_steps(step, batches, device, args.profile_steps)
            batch = {k: v.to(device) for k, v in batches[0].items()}
            profile["phases"] = step_phases(step, batch, device, args.profile_steps)
        step.engine.destroy()
        tokens_per_update = args.micro_batch * args.seq_len * args.grad_accum
        tokens_per_s, gemm_s = tokens_per_update / seconds[name], seconds[GEMM]
        fp8_projections = step.fp8_projections
    else:
        tokens_per_s, gemm_s = a_result["rows"][name]["tokens_per_s"], a_result["gemm_s"]
    gemm = 2 * gemm_n**3 / gemm_s
    width = config.n_heads * config.head_dim  # attention's: d_model unless head_dim is set apart
    per_token = flops_per_token(config.matmul_parameters(), config.n_layers, width, args.seq_len)
    achieved = tokens_per_s * per_token
    tokens_per_step = args.micro_batch * args.seq_len
    useful = statistics.mean(useful_flops(config, b) for b in batches) * tokens_per_s / tokens_per_step
    device_name, peak = gpu_peak(device)
    return {
        "step": name,
        "fp8": args.fp8,
        "fp8_select": args.fp8_select,
        "fp8_projections": fp8_projections,  # how many of the projections ran in fp8
        "grad_accum": args.grad_accum,
        "overflow_check": not args.no_overflow_check,
        "speedup_vs_reduction_per_micro_batch": vs_per_micro_batch,
        "loss_gap_vs_reduction_per_micro_batch": loss_gap,  # relative, after the last step
        "flops_per_token": per_token,
        "tokens_per_s": tokens_per_s,
        "achieved_flops": achieved,
        "useful_flops": useful,
        "gemm_n": gemm_n,
        "gemm_bf16_flops": gemm,
        "fraction_of_gemm": achieved / gemm,
        "useful_fraction_of_gemm": useful / gemm,
        "device_bf16_peak": peak,
        "mfu": achieved / peak if peak else None,
        "device": device_name,
        "targets": {"fraction_of_gemm": 0.75, "mfu_gpu": 0.45},
        "profile": profile,
    }


# ----------------------------------------------------------------------------- report


def print_tables(result: dict) -> None:
    if "a" in result:
        a = result["a"]
        steps = result["config"]["steps"]
        print(f"\n(a) train step, {a['tokens_per_step']} tokens/step, median of {steps} steps")
        print(f"{'contender':<32}{'step s':>10}{'tokens/s':>12}{'vs HF':>8}")
        for name, row in a["rows"].items():
            print(
                f"{name:<32}{row['step_s']:>10.3f}{row['tokens_per_s']:>12.0f}{a['speedup_vs_hf'][name]:>7.2f}x"
            )
    if "b" in result:
        b = result["b"]
        print(f"\n(b) {b['documents']} documents at seq {b['seq_len']} ({b['documents_from']})")
        if b["token_efficiency_whole_split"]:
            whole = b["token_efficiency_whole_split"]
            shares = ", ".join(f"{k} {v:.1%}" for k, v in whole.items() if k != "documents")
            print(f"    token efficiency, whole train split ({whole['documents']:,} documents): {shares}")
        print(f"{'layout':<29}{'batches':>8}{'efficiency':>12}{'trained tok/s':>15}{'packing gain':>14}")
        rows = [(name, row, name) for name, row in b["layouts"].items()]
        rows += [(f"{name} (HF model)", row, name + HF_SUFFIX) for name, row in b["hf_padded"].items()]
        for label, row, key in rows:
            gain = b["packing_speedup"].get(key)
            gain_text = f"{gain:.2f}x" if gain else "-"
            print(
                f"{label:<29}{row['batches']:>8}{row['token_efficiency']:>12.1%}"
                f"{row['trained_tokens_per_s']:>15.0f}{gain_text:>14}"
            )
    if "c" in result:
        c = result["c"]
        giga = 1e9
        print(
            f"\n(c) {c['flops_per_token'] / giga:.3f} GFLOP/token x {c['tokens_per_s']:.0f} tokens/s"
            f" = {c['achieved_flops'] / giga:.1f} GFLOP/s; bf16 GEMM {c['gemm_n']}^3"
            f" {c['gemm_bf16_flops'] / giga:.1f} GFLOP/s -> {c['fraction_of_gemm']:.1%} of GEMM"
        )
        print(
            f"    useful work only (real tokens, LM head on trained tokens, causal in-document attention):"
            f" {c['useful_flops'] / giga:.1f} GFLOP/s -> {c['useful_fraction_of_gemm']:.1%} of GEMM"
        )
        if c.get("speedup_vs_reduction_per_micro_batch"):
            print(
                f"    {c['grad_accum']} micro-batches per update, gradients reduced once per update:"
                f" {c['speedup_vs_reduction_per_micro_batch']:.2f}x the step reducing them in every one"
                " (DeepSpeed's ZeRO 2 alone), side by side; last losses"
                f" {c['loss_gap_vs_reduction_per_micro_batch']:.2e} apart"
            )
        if c["mfu"] is not None:
            peak = c["device_bf16_peak"] / 1e12
            print(f"    MFU vs {c['device']} bf16 peak {peak:.0f} TFLOP/s: {c['mfu']:.1%}")
        profile = c.get("profile")
        if profile:
            print(
                f"    where a step's time goes ({profile['steps']} profiled steps): "
                f"{profile['wall_ms_per_step']:.1f} ms per step, {profile['busy_ms_per_step']:.1f} ms of it "
                f"in {profile['clock']} time of the ops' own; share, ms per step, calls per step:"
            )
            print_ranked(profile["top"])
            if "host_top" in profile:
                print(
                    f"    the host's side: {profile['host_busy_ms_per_step']:.1f} ms per step of the ops' own"
                    " CPU time; share, ms per step, calls per step:"
                )
                print_ranked(profile["host_top"])
            print("    each phase: host ms (until queued), ms until the device ran it, times per update:")
            for phase, row in profile["phases"].items():
                print(f"      {phase:<16}{row['host_ms']:9.2f}{row['done_ms']:9.2f}{row['per_update']:6d}")


def print_ranked(rows: list[dict]) -> None:
    for row in rows:
        share, ms, calls = row["share"], row["ms_per_step"], row["calls_per_step"]
        print(f"      {share:6.1%} {ms:9.3f} {calls:7.1f}  {row['op'][:100]}")


def run(args: argparse.Namespace) -> int:
    out = check_bench_out(args.out or RESULTS_DIR / f"train_throughput{'.quick' if args.quick else ''}.json")
    if args.quick:
        args.preset, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 64, 2, 2, 1
        args.b_seq_len, args.b_rows, args.gemm_size = 128, 4, args.gemm_size or 256
    if not args.parts:
        raise UserError("--parts names no part: pass some of a, b, c")
    device = available_device(args.device)
    torch.manual_seed(args.seed)
    config = ModelConfig.preset(
        args.preset,
        max_seq_len=max(args.seq_len, 128),
        kernels=args.kernels,
        **model_overrides(args.override),
    )
    device_name, _ = gpu_peak(device)
    result = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        # the machine record (bench_result.machine) has the load as the result is written: this is before
        "load_average_1min_at_start": os.getloadavg()[0],
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model_parameters": config.num_parameters(),
    }
    generator = random.Random(args.seed)
    docs = synthetic_documents(args.micro_batch * 16, config.vocab_size, args.seq_len, generator)
    batches = batches_of(pack_rows(docs, args.seq_len), args.micro_batch)
    batches = [b for b in batches if b["input_ids"].shape[0] == args.micro_batch] or batches
    if "a" in args.parts:
        gemm = gemm_step(gemm_size(args, device), device) if "c" in args.parts else None
        result["a"] = part_a(args, config, device, batches, gemm)
        gc.collect()
    if "c" in args.parts:
        result["c"] = part_c(args, config, device, result.get("a"), batches)
    if "b" in args.parts:
        result["b"] = part_b(args, device)
    print_tables(result)
    start_load, end_load = result["load_average_1min_at_start"], os.getloadavg()[0]
    print(f"\n{device_name}, {torch.get_num_threads()} threads, load {start_load:.1f} -> {end_load:.1f}")
    write_bench_json(out, result, __file__)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
