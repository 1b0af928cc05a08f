"""Document attention on CPU: dense-mask SDPA (what llama.py used before) vs ``document_attention``.

    python bench/attention.py                # three layouts, 5 timed steps each (about a minute)
    python bench/attention.py --repeats 9    # steadier medians on a noisy machine
    python bench/attention.py --threads 1    # one core: while a neighbour holds the other
    python bench/attention.py --quick        # tiny shapes: a smoke test, not a measurement

One step is ``out.backward(grad)`` of one attention layer (H=12, D=64, bf16, as the 112m preset) on
the same q, k, v and document ids. The layouts:

- ``packed 4x512``: documents of lognormal length (mu 4.35, sigma 0.65: mean ~90, a few long ones)
  back to back, the last one cut at the row end;
- ``packed 16x1024``: the same with the length profile of the shared SFT mix (mean ~191, p95 ~410,
  capped at 1024: mu 5.1, sigma 0.56);
- ``padded 16xlongest``: one such document per row, padded to the longest in the batch (what the
  Hugging Face collator feeds), padding as document -1.

The implementations take turns step by step (A B C A B C ...), so a neighbour stealing the CPU slows
them alike; each figure is the median after one untimed step. But a busy machine hurts
``document_attention`` (a hundred ops, each waiting for a descheduled thread) far more than the one
dense kernel: compare on a quiet one. The table also gives the largest output difference on
non-padding positions (bf16 rounding, ~1e-2). Writes ``bench/results/attention.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.model.attention import document_attention  # noqa: E402
from ds_sft.options import COUNT, SEED, THREADS, Int  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
HEADS, HEAD_DIM = 12, 64


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=COUNT, default=5, help="timed steps per implementation and layout")
    parser.add_argument(
        "--tile", type=Int(1, 2**16), default=64, help="query tile of document_attention (tokens)"
    )
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the document lengths and tensors")
    parser.add_argument(
        "--threads", type=THREADS, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: a smoke test")
    return parser


def document_lengths(rng: random.Random, mu: float, sigma: float, cap: int):
    while True:
        yield min(cap, max(4, int(rng.lognormvariate(mu, sigma))))


def packed_rows(rng, batch, seq_len, mu, sigma) -> torch.Tensor:
    """Documents back to back in each row; the last one is cut at the row end."""
    rows = []
    for _ in range(batch):
        ids, lengths = [], document_lengths(rng, mu, sigma, seq_len)
        while len(ids) < seq_len:
            ids += [ids[-1] + 1 if ids else 0] * next(lengths)
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def padded_rows(rng, batch, max_len, mu, sigma) -> torch.Tensor:
    """One document per row, padded (document -1) to the longest in the batch."""
    lengths = document_lengths(rng, mu, sigma, max_len)
    sizes = [next(lengths) for _ in range(batch)]
    longest = max(sizes)
    return torch.tensor([[0] * n + [-1] * (longest - n) for n in sizes])


def dense_mask_attention(q, k, v, document_ids):
    """What llama.py ran on CPU before document_attention: SDPA with the [B, 1, T, T] block-diagonal mask."""
    position = torch.arange(q.shape[2])
    causal = position[None, :] <= position[:, None]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same_document)[:, None])


def measure(document_ids: torch.Tensor, args) -> dict:
    B, T = document_ids.shape
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, HEADS, T, HEAD_DIM, dtype=torch.bfloat16)
    implementations = {
        "dense_mask_sdpa": lambda: dense_mask_attention(q, k, v, document_ids),
        "document_attention": lambda: document_attention(q, k, v, document_ids, tile=args.tile),
        # not the same result on packed rows (documents see each other): one dense kernel, for scale
        "causal_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }

    def step(attention) -> tuple[float, torch.Tensor]:
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        out = attention()
        out.backward(grad)
        return time.perf_counter() - start, out.detach()

    outputs = {name: step(attention)[1] for name, attention in implementations.items()}  # warm-up
    times = {name: [] for name in implementations}
    for _ in range(args.repeats):
        for name, attention in implementations.items():
            times[name].append(step(attention)[0])
    real = (document_ids >= 0)[:, None, :, None]
    difference = ((outputs["dense_mask_sdpa"] - outputs["document_attention"]).float() * real).abs().max()
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    starts = (document_ids[:, 1:] != document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
    n_documents = int(starts.sum()) + B
    return {
        "batch": B,
        "seq_len": T,
        "documents": n_documents,
        "mean_document_len": round(int((document_ids >= 0).sum()) / n_documents, 1),
        "ms": {name: round(t, 2) for name, t in ms.items()},
        "speedup": round(ms["dense_mask_sdpa"] / ms["document_attention"], 2),
        "speedup_vs_causal_sdpa": round(ms["causal_sdpa"] / ms["document_attention"], 2),
        "max_abs_difference": float(difference),
    }


def run(args: argparse.Namespace) -> None:
    path = check_bench_out(RESULTS_DIR / ("attention.quick.json" if args.quick else "attention.json"))
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    scale = 8 if args.quick else 1  # --quick: 8x shorter rows
    args.repeats = 1 if args.quick else args.repeats
    layouts = {
        "packed 4x512": packed_rows(rng, 4, 512 // scale, 4.35, 0.65),
        "packed 16x1024": packed_rows(rng, 16, 1024 // scale, 5.1, 0.56),
        "padded 16xlongest": padded_rows(rng, 16, 1024 // scale, 5.1, 0.56),
    }
    results = {}
    print(
        f"{'layout':18s} {'B x T':>11s} {'docs':>5s} {'mean len':>8s} {'dense ms':>9s} {'ours ms':>8s} "
        f"{'speedup':>8s} {'causal ms':>10s} {'max|diff|':>9s}"
    )
    for name, document_ids in layouts.items():
        r = results[name] = measure(document_ids, args)
        print(
            f"{name:18s} {r['batch']:>4d} x {r['seq_len']:<4d} {r['documents']:5d} "
            f"{r['mean_document_len']:8.1f} {r['ms']['dense_mask_sdpa']:9.1f} "
            f"{r['ms']['document_attention']:8.1f} {r['speedup']:7.2f}x "
            f"{r['ms']['causal_sdpa']:10.1f} {r['max_abs_difference']:9.1e}"
        )
    print("speedup = dense ms / ours ms; causal = SDPA(is_causal) without the document mask (not equal)")
    meta = {
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "tile": args.tile,
        "repeats": args.repeats,
    }
    write_bench_json(path, {"config": meta, "layouts": results}, __file__)
    print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
