"""Does fp8 pay? Prints side-by-side ratios and writes bench/results/fp8.json.

    python bench/fp8.py            # GPU: 112m and a d_model-2048 model; CPU: the 112m step, fp8 vs bf16
    python bench/fp8.py --quick    # fewer steps and smaller shapes: a smoke test

GPU (CUDA present): training tokens/s (forward + backward + AdamW, bf16 autocast, fp32 master
weights) of the whole model with the projections in bf16 (``--fp8 off``), in Transformer Engine fp8
(``te``; skipped with the reason when TE cannot run) and in ``--fp8 torch`` (``torch._scaled_mm``
on the fp8 tensor cores), each with every projection in fp8 (``select all``) and with the roofline's
choice (``select auto``). Two widths: the ``112m`` preset (d_model 768) and ``wide`` (d_model 2048,
8 layers): fp8 halves the GEMM time but adds casts and amax reductions per tensor, so it pays only
once the GEMMs dominate, which at d_model 768 they barely do. The modes of one width live side by
side and take turns step by step, so the ratio column (which way it went on this card) is measured
under the same clocks and neighbours; a select-auto row that chose no projection runs the bf16 model,
and its distance from 1.00x is the measurement's spread. ``--no-cpu`` skips the CPU part.

CPU: there is no fp8 arithmetic, so ``--fp8 torch`` runs its numerics dequantized (the same
roundings and scales, bf16 GEMMs). (1) One training step of the 112m preset (``tiny`` with
``--quick``), fp8 against bf16, the two alternating so machine load hits both alike: the price of
fp8 numerics on CPU, which should stay under 2x. (2) One linear, forward + backward, in
``nn.Linear``, the dequantized fp8 path and ``torch._scaled_mm`` itself (CPU's reference kernel).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.model.config import KERNEL_BACKENDS, ModelConfig  # noqa: E402
from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, apply_fp8, fp8_autocast, fp8_layout  # noqa: E402
from ds_sft.model.llama import LlamaModel  # noqa: E402
from ds_sft.options import COUNT, INT32_MAX, Choice, Int, Text  # noqa: E402

# name -> (config overrides of the 112m preset, micro-batch); 16 x 1024 tokens = 16,384 per step.
GPU_MODELS = {
    "112m": ({}, 16),
    "wide": (dict(d_model=2048, n_heads=16, n_layers=8, ffn_hidden=5632), 8),  # ~514M parameters
}


# (row label, --fp8 mode, recipe select, Float8Linear.compiled_casts): "torch eager casts" is the
# torch path as it ran before its casts were compiled, to show what compiling them is worth
GPU_MODES = [
    ("bf16", "off", "all", None),
    ("te", "te", "all", None),
    ("te auto", "te", "auto", None),
    ("torch", "torch", "all", None),
    ("torch auto", "torch", "auto", None),
    ("torch eager casts", "torch", "all", False),
]
CASTS = {None: "compiled on fp8 tensor cores", False: "eager"}  # a row's compiled_casts, in words


def alternating_step_times(models: dict[str, tuple], inputs, labels, warmup: int, steps: int) -> dict:
    """Median seconds of one training step (forward, backward, fused AdamW; bf16 autocast over fp32
    master weights) of each ``label: (model, mode, recipe)``, the models taking turns step by step
    (A B C A B C ...) so that a busy neighbour or a clock change hits all of them alike. On CUDA each
    step is synchronized before and after, and also reports the memory it took beyond what was
    resident (activations, gradients): the models live side by side, so a global peak says nothing."""
    device = inputs.device
    cuda = device.type == "cuda"
    optimizers = {
        label: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for label, (m, _, _) in models.items()
    }
    times = {label: [] for label in models}
    step_memory = dict.fromkeys(models, 0)
    for step in range(warmup + steps):
        for label, (model, mode, recipe) in models.items():
            if cuda:
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16), fp8_autocast(mode, recipe):
                loss = model(inputs, labels=labels) / labels.numel()
            loss.backward()
            optimizers[label].step()
            optimizers[label].zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:  # after the first step, whose AdamW allocates its moments
                times[label].append(time.perf_counter() - start)
                if cuda:
                    step_memory[label] = max(step_memory[label], torch.cuda.max_memory_allocated() - resident)
    return {
        label: {"step_s": statistics.median(times[label]), "step_gib": step_memory[label] / 2**30}
        for label in models
    }


def width_comparison(
    name: str,
    config: ModelConfig,
    micro_batch: int,
    device: torch.device,
    seq_len: int,
    warmup: int,
    steps: int,
) -> list[dict]:
    """Training tokens/s of one model in every mode of :data:`GPU_MODES`, side by side (one process,
    alternating steps, the same initial weights and tokens); a mode that cannot run here (TE absent)
    is a row with the reason."""
    tokens = micro_batch * seq_len
    models, rows = {}, {}
    for label, mode, select, compiled_casts in GPU_MODES:
        torch.manual_seed(0)
        model = LlamaModel(config).to(device).train()
        recipe = Fp8Recipe(select=select)
        try:
            apply_fp8(model, mode, recipe, tokens=tokens, device=device, say=print)
        except UserError as err:
            rows[label] = {"model": name, "mode": label, "skipped": str(err)}
            continue
        layers = [layer for layer in model.modules() if isinstance(layer, Float8Linear)]
        for layer in layers:
            layer.compiled_casts = compiled_casts
        models[label] = (model, mode, recipe)
        rows[label] = {
            "model": name,
            "mode": label,
            "d_model": config.d_model,
            "parameters": config.num_parameters(),
            "fp8_projections": (fp8_layout(model, None) or {}).get("layers", 0),
            "casts": CASTS[compiled_casts] if layers else "-",
            "tokens_per_step": tokens,
        }
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), device=device)
    for label, timing in alternating_step_times(models, ids[:, :-1], ids[:, 1:], warmup, steps).items():
        rows[label].update(timing, tokens_per_s=tokens / timing["step_s"])
        rows[label]["vs_bf16"] = rows[label]["tokens_per_s"] / rows["bf16"]["tokens_per_s"]
    del models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def cpu_step_ratio(preset: str, micro_batch: int, seq_len: int, repeats: int) -> dict:
    """Median seconds of one training step of ``preset`` with the projections in bf16 and in
    ``--fp8 torch`` (its numerics dequantized on CPU), the two alternating."""
    models = {}
    for label, mode in (("bf16", "off"), ("fp8_torch", "torch")):
        torch.manual_seed(0)
        models[label] = (
            apply_fp8(LlamaModel(ModelConfig.preset(preset)), mode, Fp8Recipe()).train(),
            mode,
            None,
        )
    vocab = models["bf16"][0].config.vocab_size
    ids = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    # the first round warms both up
    medians = {
        label: timing["step_s"]
        for label, timing in alternating_step_times(models, ids[:, :-1], ids[:, 1:], 1, repeats).items()
    }
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


def cpu_report(report: dict, quick: bool) -> None:
    """The CPU measurements: the training step ratio and one linear in each implementation."""
    preset, micro_batch, seq_len = ("tiny", 2, 64) if quick else ("112m", 2, 256)
    step = report["cpu_step"] = cpu_step_ratio(preset, micro_batch, seq_len, repeats=1 if quick else 3)
    print(
        f"CPU, one training step of {preset} ({micro_batch} x {seq_len} tokens, bf16 autocast): "
        f"bf16 {step['bf16_step_s']:.2f} s, fp8 torch {step['fp8_torch_step_s']:.2f} s "
        f"-> fp8 takes {step['ratio']:.2f}x the bf16 step (target <= 2x)"
    )
    cpu_shapes = [(256, 256, 256)] if quick else [(256, 256, 256), (512, 768, 768), (512, 768, 2048)]
    report["cpu_linear"] = [cpu_linear(*shape, repeats=3 if quick else 10) for shape in cpu_shapes]
    print(
        "CPU, forward + backward of one linear (bf16 autocast), ms: nn.Linear | fp8 dequantized | _scaled_mm"
    )
    for row in report["cpu_linear"]:
        print(
            f"  tokens x in x out {row['shape']}: {row['bf16_ms']:8.2f} | {row['fp8_dequantized_ms']:8.2f} | "
            f"{row['fp8_scaled_mm_ms']:8.2f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller shapes (a smoke test)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements (on a GPU machine)")
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
    args.out = check_bench_out(args.out)
    if args.quick:
        args.steps, args.warmup, args.seq_len = 3, 2, min(args.seq_len, 256)

    report = {}
    if not args.no_cpu:
        cpu_report(report, args.quick)
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        report["gpu"] = []
        print(
            f"GPU {report['device']}: training tokens/s, seq {args.seq_len}, modes taking turns step by step"
        )
        for name, (overrides, micro_batch) in GPU_MODELS.items():
            config = ModelConfig.preset("112m", kernels=args.kernels, **overrides)
            device = torch.device("cuda", torch.cuda.current_device())
            for row in width_comparison(
                name, config, micro_batch, device, args.seq_len, args.warmup, args.steps
            ):
                report["gpu"].append(row)
                if "skipped" in row:
                    print(f"  {name:5s} {row['mode']:10s} skipped: {row['skipped']}")
                    continue
                print(
                    f"  {name:5s} {row['mode']:10s} {row['tokens_per_s']:10.0f} tok/s  "
                    f"{row['vs_bf16']:.2f}x bf16  fp8 in {row['fp8_projections']} projections  "
                    f"step +{row['step_gib']:.1f} GiB"
                )
    else:
        print("GPU: no CUDA device here; the tokens/s comparison runs where one is")

    write_bench_json(args.out, report, __file__)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
