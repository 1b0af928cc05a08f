"""How fast is the bare model? Forward + backward tokens/s of ds-sft's LlamaModel next to
transformers' LlamaForCausalLM of the same config, in fp32 and under bf16 autocast.

    python bench/model_speed.py                      # 112m preset, seq 512 x 4, 5 timed steps
    python bench/model_speed.py --preset smollm2-135m --steps 3
    python bench/model_speed.py --quick              # tiny sizes: a smoke test, not a measurement

One step is ``loss.backward()`` of the summed token loss (ds-sft: ``kernels.linear_cross_entropy``;
transformers: its own ``labels=`` loss); no optimizer, so this measures the model and nothing else
(``train_throughput.py`` measures the whole training step). The two models take turns step by step
(A B A B ...) so a neighbour stealing the CPU slows both alike; each figure is the median step after
``--warmup`` untimed ones. Prints a table with the ratios and writes ``bench/results/model_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.labels import IGNORE_INDEX  # noqa: E402
from ds_sft.model.config import KERNEL_BACKENDS, PRESETS, ModelConfig  # noqa: E402
from ds_sft.model.hf_families import hf_config  # noqa: E402
from ds_sft.model.llama import LlamaModel  # noqa: E402
from ds_sft.model.param_names import to_hf_state_dict  # noqa: E402
from ds_sft.options import COUNT, INT32_MAX, Choice, Int, Names  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__)
    parser.add_argument(
        "--preset", type=Choice(*PRESETS), default="112m", help="ModelConfig preset to time (default: 112m)"
    )
    parser.add_argument("--seq_len", type=Int(8, 2**20), default=512, help="tokens per row (default: 512)")
    parser.add_argument("--batch_size", type=Int(1, 2**16), default=4, help="rows per step (default: 4)")
    parser.add_argument(
        "--steps", type=COUNT, default=5, help="timed steps per contender and dtype (default: 5)"
    )
    parser.add_argument(
        "--warmup", type=Int(0, INT32_MAX), default=1, help="untimed steps first (default: 1)"
    )
    parser.add_argument(
        "--dtypes",
        type=Names("fp32", "bf16"),
        default=["fp32", "bf16"],
        help="comma list of fp32, bf16 (default: both)",
    )
    parser.add_argument(
        "--kernels",
        type=Choice(*KERNEL_BACKENDS),
        default="auto",
        help="kernels backend of ds-sft's model (default: auto)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, seq 64 x 2, 2 steps: a smoke test")
    return parser


def run(args: argparse.Namespace) -> int:
    path = check_bench_out(RESULTS_DIR / f"model_speed{'.quick' if args.quick else ''}.json")
    if not args.dtypes:
        raise UserError("--dtypes names no dtype: pass fp32, bf16 or both")
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.steps, args.warmup = "tiny", 64, 2, 2, 1
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, 128), kernels=args.kernels)
    ours = LlamaModel(config).train()
    theirs = LlamaForCausalLM(hf_config(config)).train()
    theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def ours_step():
        ours(ids, labels=labels).backward()

    def theirs_step():
        # transformers shifts labels itself and averages; the sum keeps the work identical to ours
        logits = theirs(ids).logits
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
        ).backward()

    tokens = args.batch_size * args.seq_len
    rows = []
    for dtype in args.dtypes:
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        )
        times: dict[str, list[float]] = {"ds-sft": [], "transformers": []}
        for step in range(args.warmup + args.steps):
            for name, fn, model in (("ds-sft", ours_step, ours), ("transformers", theirs_step, theirs)):
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                with autocast:
                    fn()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "dtype": dtype,
                "ds_sft_tokens_per_s": tokens / medians["ds-sft"],
                "transformers_tokens_per_s": tokens / medians["transformers"],
                "speedup": medians["transformers"] / medians["ds-sft"],
                "step_seconds": times,
            }
        )

    print(f"{args.preset} ({ours.num_parameters():,} parameters), seq {args.seq_len} x {args.batch_size}, "
          f"forward + backward, median of {args.steps} steps, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'dtype':<6} {'ds-sft tok/s':>13} {'transformers tok/s':>19} {'ds-sft / transformers':>22}")
    for row in rows:
        ours_rate, theirs_rate = row["ds_sft_tokens_per_s"], row["transformers_tokens_per_s"]
        print(f"{row['dtype']:<6} {ours_rate:>13.0f} {theirs_rate:>19.0f} {row['speedup']:>21.2f}x")

    result = {
        "preset": args.preset,
        "parameters": ours.num_parameters(),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "kernels_backend": config.kernels,
        "rows": rows,
    }
    write_bench_json(path, result, __file__)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
