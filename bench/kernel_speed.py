"""The kernels against their eager references: prints ratios, writes bench/results/kernel_speed.json.

    python bench/kernel_speed.py            # CPU: 16 x 512 tokens, hidden 768, vocab 50,304 (about 2 minutes)
    python bench/kernel_speed.py --quick    # small shapes: a smoke test for CI
    python bench/kernel_speed.py --tokens 4096 --vocab 151936 128256   # Qwen's and Llama 3's vocabularies

CPU: peak memory and time of the loss (forward + backward) — the chunked ``linear_cross_entropy``
(``backend="torch"``) against eager logits + cross-entropy (``ds_sft.kernels.reference``), fp32 and bf16, for
each ``--vocab``; the chunked / eager ratios of every vocabulary end the run side by side, against the
targets (memory <= 0.1x, time <= 1.0x). Memory: each case runs in a fresh process: peak RSS is a
per-process high-water mark, and torch's CPU allocator keeps nothing cached, so the growth of
``VmHWM`` over the RSS before the step is the memory the loss needs (the inputs' gradients included,
the same for both). Time: eager and chunked steps alternate in one process (median of ``--repeats``),
so load from other work hits both alike. The chunk size defaults to the kernel's own choice for each
vocabulary (``default_chunk_size``: whole 32-token blocks within 128 MB of fp32 logits).

GPU (only where CUDA is present): RMSNorm and cross-entropy, forward + backward, Triton kernels vs
torch eager, ``torch.compile`` and Liger-Kernel when installed, each case timed in turn over rounds
(median; :func:`time_in_rounds`); achieved bandwidth as a fraction of the device's datasheet peak
(``ds_sft.train.metrics.GPU_PEAK_BANDWIDTH``; compulsory traffic only: each input read once, each
output written once). Then
the fused linear cross-entropy vs eager: time and peak ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `ds_sft` is importable

from ds_sft import kernels  # noqa: E402
from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.errors import UserError  # noqa: E402
from ds_sft.kernels.fused_linear_cross_entropy import default_chunk_size  # noqa: E402
from ds_sft.kernels.reference import (  # noqa: E402
    cross_entropy_reference,
    linear_cross_entropy_reference,
    rms_norm_reference,
)
from ds_sft.options import COUNT, Choice, Int, Text, checked  # noqa: E402
from ds_sft.train.metrics import datasheet_bandwidth  # noqa: E402

SIZE = Int(1, 2**24)  # tokens, hidden width, vocabulary or chunk

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What the fused loss must achieve on CPU against eager logits + cross-entropy (issue 17).
MEMORY_TARGET, TIME_TARGET = 0.1, 1.0


# ---------------------------------------------------------------- CPU: one case per fresh process


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


METHODS = ("eager", "chunked")


def _loss_inputs(dtype: str, tokens: int, hidden: int, vocab: int):
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden).to(DTYPES[dtype]).requires_grad_()
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(DTYPES[dtype]).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,))


def _loss_step(method: str, h, w, labels, chunk_size: int) -> float:
    """Forward + backward of the summed loss, from fresh gradients."""
    h.grad = w.grad = None
    if method == "eager":
        loss = linear_cross_entropy_reference(h, w, labels)
    else:
        loss = kernels.linear_cross_entropy(h, w, labels, chunk_size=chunk_size, backend="torch")
    loss.backward()
    return loss.item()


def run_memory_case(method: str, dtype: str, tokens: int, hidden: int, vocab: int, chunk_size: int) -> dict:
    """In a fresh process: the growth of peak RSS over one forward + backward, after a warm-up."""
    h, w, labels = _loss_inputs(dtype, tokens, hidden, vocab)
    _loss_step(method, h, w, labels, chunk_size)  # thread pools, first touch of the weights
    h.grad = w.grad = None
    baseline_kib = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    loss = _loss_step(method, h, w, labels, chunk_size)
    return {"loss": loss, "peak_mb": (_proc_status_kib("VmHWM") - baseline_kib) / 1024}


def run_timing_case(dtype: str, tokens: int, hidden: int, vocab: int, chunk_size: int, repeats: int) -> dict:
    """Eager and chunked steps alternated in one process, so a busy machine slows both alike."""
    h, w, labels = _loss_inputs(dtype, tokens, hidden, vocab)
    times = {method: [] for method in METHODS}
    for repeat in range(repeats + 1):
        for method in METHODS:
            start = time.perf_counter()
            _loss_step(method, h, w, labels, chunk_size)
            if repeat:  # the first round is the warm-up
                times[method].append(time.perf_counter() - start)
    return times


CASES = {case.__name__: case for case in (run_memory_case, run_timing_case)}  # what --case may run
# Each argument of a case in the domain of the public flag it comes from
CASE_DOMAINS = {"method": Choice(*METHODS), "dtype": Choice(*DTYPES), "tokens": SIZE, "hidden": SIZE,
                "vocab": SIZE, "chunk_size": SIZE, "repeats": COUNT}  # fmt: skip


def run_case(text: str) -> dict:
    """``--case '[name, *args]'``: one of :data:`CASES`, in this (fresh) process, every argument in
    its flag's domain (a wrong one was a KeyError or a negative-size traceback)."""
    try:
        name, *case_args = json.loads(text)
        case = CASES[name]
        bound = inspect.signature(case).bind(*case_args)
    except (ValueError, TypeError, KeyError):
        raise UserError(f"--case takes a JSON list [name, *args], name one of {sorted(CASES)}") from None
    for parameter, value in bound.arguments.items():
        checked(f"--case {name}: {parameter}", value, CASE_DOMAINS[parameter])
    return case(*case_args)


def _in_fresh_process(function: str, *args):
    command = [sys.executable, __file__, "--case", json.dumps([function, *args])]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode == 2 and out.stderr.strip():  # the case's own one-line error (out of memory...)
        raise UserError(out.stderr.strip().splitlines()[-1].partition(": error: ")[2] or out.stderr.strip())
    if out.returncode != 0:
        raise RuntimeError(f"{function}{args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_benchmarks(args) -> list[dict]:
    threads = torch.get_num_threads()
    results = []
    for vocab in args.vocab:
        chunk_size = args.chunk_size or default_chunk_size(vocab)
        shape = f"{args.tokens} tokens x hidden {args.hidden} x vocab {vocab:,}"
        print(f"\nCPU loss forward+backward, {shape}, {chunk_size}-token chunks, {threads} threads")
        print(f"{'dtype':<9} {'method':<8} {'peak MB':>9} {'time s':>8}   chunked / eager")
        for dtype in DTYPES:
            sizes = (args.tokens, args.hidden, vocab, chunk_size)
            row = {"vocab": vocab, "chunk_size": chunk_size, "dtype": dtype}
            for method in METHODS:
                row[method] = _in_fresh_process("run_memory_case", method, dtype, *sizes)
            times = _in_fresh_process("run_timing_case", dtype, *sizes, args.repeats)
            for method in METHODS:
                row[method].update(time_s=statistics.median(times[method]), times_s=times[method])
            row["memory_ratio"] = row["chunked"]["peak_mb"] / row["eager"]["peak_mb"]
            row["time_ratio"] = row["chunked"]["time_s"] / row["eager"]["time_s"]
            for method in METHODS:
                ratio = (
                    f"   memory {row['memory_ratio']:.3f}x, time {row['time_ratio']:.2f}x"
                    if method == "chunked"
                    else ""
                )
                peak, seconds = row[method]["peak_mb"], row[method]["time_s"]
                print(f"{dtype:<9} {method:<8} {peak:>9.0f} {seconds:>8.3f}{ratio}")
            results.append(row)
    print(f"\nchunked / eager (targets: memory <= {MEMORY_TARGET}x, time <= {TIME_TARGET}x)")
    print(f"{'vocab':>8} {'chunk':>6} {'dtype':<9} {'memory':>8} {'time':>6}")
    for row in results:
        met = row["memory_ratio"] <= MEMORY_TARGET and row["time_ratio"] <= TIME_TARGET
        print(
            f"{row['vocab']:>8} {row['chunk_size']:>6} {row['dtype']:<9} {row['memory_ratio']:>7.3f}x "
            f"{row['time_ratio']:>5.2f}x  {'meets' if met else 'MISSES'} the targets"
        )
    return results


# ---------------------------------------------------------------- GPU


def _liger():
    """Liger-Kernel's functional RMSNorm, cross-entropy and fused linear cross-entropy, or None when it
    is not installed."""
    try:
        from liger_kernel.transformers.functional import (
            liger_cross_entropy,
            liger_fused_linear_cross_entropy,
            liger_rms_norm,
        )
    except ImportError:
        return None
    return {
        "rms_norm": liger_rms_norm,
        "cross_entropy": liger_cross_entropy,
        "fused_linear_cross_entropy": liger_fused_linear_cross_entropy,
    }


def _rms_norm_cases(rows, hidden, device, dtype, compiled_norm, liger) -> list[tuple]:
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    providers = {
        "eager": lambda: rms_norm_reference(x, w, 1e-6),
        "compile": lambda: compiled_norm(x, w, 1e-6),
        "triton": lambda: kernels.rms_norm(x, w, 1e-6, backend="triton"),
    }
    gradients = dict.fromkeys(providers, dy)
    if liger:
        providers["liger"] = lambda: liger["rms_norm"](x, w, 1e-6)
        # Liger's backward writes dx over the dy it is given (in_place=True, its default and its users'):
        # a dy of its own, or the other providers would time theirs on Liger's dx
        gradients["liger"] = dy.clone()
    size = rows * hidden * x.element_size()
    cases = []
    for provider, fn in providers.items():
        cases.append((f"rms_norm fwd {rows}x{hidden}", provider, fn, 2 * size, None))  # read x, write y
        # + backward: read dy and x, write dx
        backward = lambda fn=fn, dy=gradients[provider]: fn().backward(dy)  # noqa: E731
        cases.append((f"rms_norm fwd+bwd {rows}x{hidden}", provider, backward, 5 * size, [x, w]))
    return cases


TIMING_ROUNDS = 3  # timed rounds over every case, after one untimed round


def time_in_rounds(cases: list[tuple], bench, rounds: int = TIMING_ROUNDS) -> dict[tuple, float | Exception]:
    """(op, provider) -> the median of ``rounds`` timings of its ``fn`` by ``bench(fn, grad_to_none)``
    (milliseconds), or the exception that stopped it. Every case is timed once per round, in turn (A B
    C A B C ...), after a first round that is not counted: that round compiles (torch.compile, Triton)
    and brings the GPU's clocks up. On the first H200 run, timed one after another, every provider ran
    its first shape (hidden 768) slower than a shape 5x larger, Liger included."""
    times: dict[tuple, list[float] | Exception] = {}
    for round_index in range(rounds + 1):
        for op, provider, fn, _, grad_to_none in cases:
            key = (op, provider)
            if isinstance(times.get(key), Exception):
                continue
            try:
                ms = bench(fn, grad_to_none=grad_to_none)
            except Exception as error:  # e.g. an installed Liger with another signature: report, go on
                times[key] = error
                continue
            if round_index:
                times.setdefault(key, []).append(ms)
    return {
        key: value if isinstance(value, Exception) else statistics.median(value)
        for key, value in times.items()
    }


def gpu_bandwidth(device: torch.device) -> tuple[str, float | None]:
    """The GPU's name and its datasheet memory bandwidth in bytes/s (None for a GPU not in the table)."""
    name = torch.cuda.get_device_name(device)
    return name, datasheet_bandwidth(name)


def gpu_benchmarks(args) -> dict:
    from triton.testing import do_bench

    device = torch.device("cuda")
    name, peak = gpu_bandwidth(device)
    liger = _liger()
    dtype = torch.bfloat16
    rows = args.tokens
    vocab = args.vocab[0]  # the GPU cases run at the first vocabulary
    peak_tbs = peak / 1e12 if peak else float("nan")
    print(f"\nGPU {name}: peak bandwidth {peak_tbs:.2f} TB/s; Liger-Kernel installed: {liger is not None}")
    print(
        f"{'op':<28} {'provider':<9} {'ms':>8} {'GB/s':>8} {'of peak':>8}  (median of {TIMING_ROUNDS} rounds)"
    )

    compiled_norm = torch.compile(rms_norm_reference)
    cases = [
        case
        for hidden in (768, 4096)
        for case in _rms_norm_cases(rows, hidden, device, dtype, compiled_norm, liger)
    ]

    compiled_ce = torch.compile(cross_entropy_reference)
    logits = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device=device)
    providers = {
        "eager": lambda: cross_entropy_reference(logits, labels, reduction="mean"),
        "compile": lambda: compiled_ce(logits, labels, reduction="mean"),
        "triton": lambda: kernels.cross_entropy(logits, labels, reduction="mean", backend="triton"),
    }
    liger_logits = logits.detach().clone().requires_grad_()  # Liger overwrites its input with the gradient
    if liger:
        providers["liger"] = lambda: liger["cross_entropy"](liger_logits, labels)
    for provider, fn in providers.items():
        # compulsory traffic: read the logits once, write their gradient once
        nbytes = 2 * logits.numel() * logits.element_size()
        backward = lambda fn=fn: fn().backward()  # noqa: E731
        cases.append(
            (f"cross_entropy fwd+bwd {rows}x{vocab}", provider, backward, nbytes, [logits, liger_logits])
        )

    table = []
    timings = time_in_rounds(cases, do_bench)
    for op, provider, _, nbytes, _ in cases:
        ms = timings[(op, provider)]
        if isinstance(ms, Exception):
            table.append({"op": op, "provider": provider, "error": repr(ms)})
            print(f"{op:<28} {provider:<9} failed: {ms!r}")
            continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        frac = gbs * 1e9 / peak if peak else float("nan")
        table.append({"op": op, "provider": provider, "ms": ms, "GB/s": gbs, "fraction_of_peak": frac})
        print(f"{op:<28} {provider:<9} {ms:>8.3f} {gbs:>8.0f} {frac:>8.1%}")

    hidden = torch.randn(rows, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, args.hidden, device=device) / args.hidden**0.5).to(dtype).requires_grad_()
    compiled_lce = torch.compile(linear_cross_entropy_reference)
    providers = {
        "eager": lambda: linear_cross_entropy_reference(hidden, weight, labels),
        "compile": lambda: compiled_lce(hidden, weight, labels),
        "triton": lambda: kernels.linear_cross_entropy(
            hidden, weight, labels, chunk_size=args.chunk_size, backend="triton"
        ),
    }
    if liger:
        providers["liger"] = lambda: liger["fused_linear_cross_entropy"](hidden, weight, labels)
    fused = {}
    for provider, fn in providers.items():
        hidden.grad = weight.grad = None  # each provider's peak counts its own gradients
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            fn().backward()
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
            ms = do_bench(lambda fn=fn: fn().backward(), grad_to_none=[hidden, weight])
        except Exception as error:  # a contender that fails is reported, the others still run
            fused[provider] = {"error": repr(error)}
            print(f"linear_cross_entropy {provider:<8} failed: {error!r}")
            continue
        fused[provider] = {"ms": ms, "peak_mb": peak_mb}
        print(f"linear_cross_entropy {provider:<8} {ms:8.2f} ms  peak +{peak_mb:,.0f} MB")
    if "ms" in fused["triton"] and "ms" in fused["eager"]:
        fused["memory_ratio"] = fused["triton"]["peak_mb"] / fused["eager"]["peak_mb"]
        fused["time_ratio"] = fused["triton"]["ms"] / fused["eager"]["ms"]
        memory, speed = fused["memory_ratio"], fused["time_ratio"]
        print(f"linear_cross_entropy triton / eager: memory {memory:.3f}x, time {speed:.2f}x")
    return {"device": name, "peak_bandwidth": peak, "ops": table, "linear_cross_entropy": fused}


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and one repeat (CI smoke test)")
    parser.add_argument("--tokens", type=SIZE, default=16 * 512, help="tokens per batch (default 16 x 512)")
    parser.add_argument("--hidden", type=SIZE, default=768, help="hidden size of the LM head input")
    parser.add_argument(
        "--vocab", type=SIZE, nargs="+", default=[50304], help="vocabulary sizes (default: GPT-2's, padded)"
    )
    parser.add_argument(
        "--chunk-size",
        type=SIZE,
        default=None,
        help="tokens per chunk (default: the kernel's for each vocab)",
    )
    parser.add_argument(
        "--repeats", type=COUNT, default=3, help="timed forward+backward steps per CPU method"
    )
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU cases (GPU only)")
    parser.add_argument(
        "--out", type=Text(), default=str(ROOT / "bench" / "results" / "kernel_speed.json"), help="JSON out"
    )
    parser.add_argument("--case", type=Text(), help=argparse.SUPPRESS)  # internal: one CPU case, as JSON
    return parser


def run(args: argparse.Namespace) -> None:
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    args.out = check_bench_out(args.out)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.chunk_size, args.repeats = 1024, 256, [8192], 256, 1

    config = {k: v for k, v in vars(args).items() if k not in ("case", "out")}
    results = {"config": config, "host": platform.node(), "time": time.time()}
    if not args.no_cpu:
        results["cpu"] = cpu_benchmarks(args)
    if torch.cuda.is_available():
        results["gpu"] = gpu_benchmarks(args)
    write_bench_json(args.out, results, __file__)
    print(f"\nwrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
