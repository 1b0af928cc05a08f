"""Does fp8 pay? Prints side-by-side ratios and writes bench/results/fp8.json.

    python bench/fp8.py            # GPU: 112m and a d_model-2048 model; CPU: the 112m step, fp8 vs bf16
    python bench/fp8.py --quick    # fewer steps and smaller shapes: a smoke test

GPU (CUDA present): training tokens/s (forward + backward + AdamW, bf16 autocast, fp32 master
weights) of the whole model with the projections in bf16 (``--fp8 off``), in Transformer Engine fp8
(``te``; skipped with the reason when TE cannot run) and in ``--fp8 torch`` (``torch._scaled_mm``
on the fp8 tensor cores), each with every projection in fp8 (``select all``) and with the roofline's
choice (``select auto``). Two widths: the ``112m`` preset (d_model 768) and ``wide`` (d_model 2048,
8 layers): fp8 halves the GEMM time but adds casts and amax reductions per tensor, so it pays only
once the GEMMs dominate, which at d_model 768 they barely do. The ratio column says which way it
went on this card.

CPU: there is no fp8 arithmetic, so ``--fp8 torch`` runs its numerics dequantized (the same
roundings and scales, bf16 GEMMs). (1) One training step of the 112m preset (``tiny`` with
``--quick``), fp8 against bf16, the two alternating so machine load hits both alike: the price of
fp8 numerics on CPU, which should stay under 2x. (2) One linear, forward + backward, in
``nn.Linear``, the dequantized fp8 path and ``torch._scaled_mm`` itself (CPU's reference kernel).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.model.config import KERNEL_BACKENDS, ModelConfig  # noqa: E402
from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, apply_fp8, fp8_autocast  # noqa: E402
from ds_sft.model.llama import LlamaModel  # noqa: E402
from ds_sft.options import COUNT, INT32_MAX, Choice, Int, Text  # noqa: E402
from ds_sft.paths import write_result_file  # noqa: E402

# name -> (config overrides of the 112m preset, micro-batch); 16 x 1024 tokens = 16,384 per step.
GPU_MODELS = {
    "112m": ({}, 16),
    "wide": (dict(d_model=2048, n_heads=16, n_layers=8, ffn_hidden=5632), 8),  # ~514M parameters
}


# (row label, --fp8 mode, recipe select)
GPU_MODES = [
    ("bf16", "off", "all"),
    ("te", "te", "all"),
    ("te auto", "te", "auto"),
    ("torch", "torch", "all"),
    ("torch auto", "torch", "auto"),
]


def gpu_tokens_per_s(name: str, label: str, mode: str, select: str, args) -> dict:
    overrides, micro_batch = GPU_MODELS[name]
    config = ModelConfig.preset("112m", kernels=args.kernels, **overrides)
    model = LlamaModel(config).cuda().train()
    recipe = Fp8Recipe(select=select)
    try:
        apply_fp8(model, mode, recipe, tokens=micro_batch * args.seq_len, say=print)
    except UserError as err:
        return {"model": name, "mode": label, "skipped": str(err)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (micro_batch, args.seq_len + 1), device="cuda")
    inputs, labels = ids[:, :-1], ids[:, 1:]
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast(mode, recipe):
            loss = model(inputs, labels=labels) / labels.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens = labels.numel()
    result = {
        "model": name,
        "mode": label,
        "d_model": config.d_model,
        "parameters": config.num_parameters(),
        "tokens_per_step": tokens,
        "step_s": step_time,
        "tokens_per_s": tokens / step_time,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
    }
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return result


def cpu_step_ratio(preset: str, micro_batch: int, seq_len: int, repeats: int) -> dict:
    """Median seconds of one training step (forward, backward, AdamW; bf16 autocast over fp32 master
    weights) with the projections in bf16 and in ``--fp8 torch``, the two alternating."""
    models = {}
    for label, mode in (("bf16", "off"), ("fp8_torch", "torch")):
        torch.manual_seed(0)
        model = apply_fp8(LlamaModel(ModelConfig.preset(preset)), mode, Fp8Recipe()).train()
        models[label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    vocab = models["bf16"][0].config.vocab_size
    ids = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    times = {label: [] for label in models}
    for step in range(repeats + 1):  # the first round warms both up
        for label, (model, optimizer) in models.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(inputs, labels=labels) / labels.numel()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    return {
        "preset": preset,
        "tokens_per_step": micro_batch * seq_len,
        **{f"{label}_step_s": value for label, value in medians.items()},
        "ratio": medians["fp8_torch"] / medians["bf16"],
    }


def cpu_linear(tokens: int, d_in: int, d_out: int, repeats: int) -> dict:
    """Forward + backward of one linear under bf16 autocast: nn.Linear, dequantized fp8, _scaled_mm."""
    torch.manual_seed(0)
    layers = {"bf16": nn.Linear(d_in, d_out, bias=False)}
    for label, scaled_mm in (("fp8_dequantized", False), ("fp8_scaled_mm", True)):
        layers[label] = Float8Linear(nn.Linear(d_in, d_out, bias=False), Fp8Recipe())
        layers[label].scaled_mm = scaled_mm
    x = torch.randn(tokens, d_in, requires_grad=True)
    times = {label: [] for label in layers}
    for _ in range(repeats):
        for label, layer in layers.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.float().sum().backward()
            times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    return {"shape": [tokens, d_in, d_out], **{f"{k}_ms": v * 1e3 for k, v in medians.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller shapes (a smoke test)")
    parser.add_argument("--seq-len", type=Int(8, 2**20), default=1024, help="GPU: tokens per row")
    parser.add_argument("--steps", type=COUNT, default=20, help="GPU: timed steps per mode (median reported)")
    parser.add_argument(
        "--warmup", type=Int(0, INT32_MAX), default=5, help="GPU: untimed steps first (TE, cuBLAS warm-up)"
    )
    parser.add_argument(
        "--kernels",
        type=Choice(*KERNEL_BACKENDS),
        default="auto",
        help="model kernels: auto | triton | torch | eager",
    )
    parser.add_argument(
        "--out",
        type=Text(),
        default=str(ROOT / "bench" / "results" / "fp8.json"),
        help="where the JSON report goes",
    )
    return parser


def run(args: argparse.Namespace) -> None:
    args.out = Path(args.out)
    if args.quick:
        args.steps, args.warmup, args.seq_len = 3, 2, min(args.seq_len, 256)

    report = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
    preset, micro_batch, seq_len = ("tiny", 2, 64) if args.quick else ("112m", 2, 256)
    step = report["cpu_step"] = cpu_step_ratio(preset, micro_batch, seq_len, repeats=1 if args.quick else 3)
    print(
        f"CPU, one training step of {preset} ({micro_batch} x {seq_len} tokens, bf16 autocast): "
        f"bf16 {step['bf16_step_s']:.2f} s, fp8 torch {step['fp8_torch_step_s']:.2f} s "
        f"-> fp8 takes {step['ratio']:.2f}x the bf16 step (target <= 2x)"
    )
    cpu_shapes = [(256, 256, 256)] if args.quick else [(256, 256, 256), (512, 768, 768), (512, 768, 2048)]
    report["cpu_linear"] = [cpu_linear(*shape, repeats=3 if args.quick else 10) for shape in cpu_shapes]
    print(
        "CPU, forward + backward of one linear (bf16 autocast), ms: nn.Linear | fp8 dequantized | _scaled_mm"
    )
    for row in report["cpu_linear"]:
        print(
            f"  tokens x in x out {row['shape']}: {row['bf16_ms']:8.2f} | {row['fp8_dequantized_ms']:8.2f} | "
            f"{row['fp8_scaled_mm_ms']:8.2f}"
        )

    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        report["gpu"] = []
        print(f"GPU {report['device']}: training tokens/s, seq {args.seq_len}")
        for name in GPU_MODELS:
            baseline = None
            for label, mode, select in GPU_MODES:
                row = gpu_tokens_per_s(name, label, mode, select, args)
                report["gpu"].append(row)
                if "skipped" in row:
                    print(f"  {name:5s} {label:10s} skipped: {row['skipped']}")
                    continue
                baseline = baseline or row["tokens_per_s"]
                row["vs_bf16"] = row["tokens_per_s"] / baseline
                print(
                    f"  {name:5s} {label:10s} {row['tokens_per_s']:10.0f} tok/s  {row['vs_bf16']:.2f}x bf16"
                    f"  peak {row['peak_gib']:.1f} GiB  loss {row['loss']:.3f}"
                )
    else:
        print("GPU: no CUDA device here; the tokens/s comparison runs where one is")

    write_result_file(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
