"""Calibrate the fp8 roofline (``ds_sft/model/fp8_roofline.json``) on the GPU this runs on.

    python bench/fp8_roofline.py            # measure and print, next to the stored entry
    python bench/fp8_roofline.py --write    # and replace this GPU's entry in the JSON (commit it)
    python bench/fp8_roofline.py --quick    # smaller sizes (a smoke test; on CPU: print the table)

Writes what it measured and the stored table to bench/results/fp8_roofline[.quick].json.

Measures what ``select: "auto"`` weighs (see :mod:`ds_sft.model.fp8_roofline`): the bf16 and fp8
(``torch._scaled_mm``) GEMM rates at 8192^3, the HBM bandwidth of a large copy, and for the
``torch`` path the traffic of one cast (its time x bandwidth / elements: cast, saturate, amax and
the transposed copy the backward makes) and the fixed cost of a tiny fp8 layer over a bf16 one
(forward + backward, launches and scale updates). Transformer Engine's entries stay as they are
unless TE imports here. Without CUDA there is nothing to measure: it prints the stored table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from ds_sft.bench_result import check_bench_out, write_bench_json  # noqa: E402
from ds_sft.command import main_for_script, script_parser  # noqa: E402
from ds_sft.model.fp8 import INPUT, Float8Linear, Fp8Recipe, _import_te  # noqa: E402
from ds_sft.model.fp8_roofline import TABLE, load_table  # noqa: E402
from ds_sft.safe_write import write_result_file  # noqa: E402


def cuda_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gemm_tflops(size: int, fp8: bool, repeats: int) -> float:
    a = torch.randn(size, size, device="cuda").to(torch.bfloat16)
    b = torch.randn(size, size, device="cuda").to(torch.bfloat16)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # column-major b, as cuBLAS wants
        one = torch.ones((), device="cuda")
        seconds = cuda_seconds(
            lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), repeats
        )
    else:
        seconds = cuda_seconds(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e12


def hbm_tb_s(elements: int, repeats: int) -> float:
    src = torch.empty(elements, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / seconds / 1e12  # read + write


def torch_cast_bytes(tokens: int, width: int, hbm: float, repeats: int) -> float:
    """Bytes of HBM traffic per element that the torch path's cast costs (its time x bandwidth)."""
    layer = Float8Linear(nn.Linear(width, width, bias=False), Fp8Recipe(amax_history_len=16)).cuda()
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)

    def cast():
        (x8,), _ = layer.cast((x,), INPUT, record=True)
        x8.t().contiguous()  # the transposed copy the weight gradient's GEMM needs

    return cuda_seconds(cast, repeats) * hbm * 1e12 / x.numel()


def torch_overhead_us(repeats: int) -> float:
    """Forward + backward of a 16 x 16 x 16 fp8 layer minus a bf16 one: the per-layer fixed cost."""
    x = torch.randn(16, 16, device="cuda", requires_grad=True)
    plain = nn.Linear(16, 16, bias=False).cuda()
    fp8 = Float8Linear(nn.Linear(16, 16, bias=False), Fp8Recipe(amax_history_len=16)).cuda()

    def step(layer):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()

    return (
        max(0.0, cuda_seconds(lambda: step(fp8), repeats) - cuda_seconds(lambda: step(plain), repeats)) * 1e6
    )


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--write", action="store_true", help=f"replace this GPU's entry in {TABLE.name}")
    return parser


def run(args: argparse.Namespace) -> None:
    table = load_table()
    out = check_bench_out(ROOT / "bench" / "results" / f"fp8_roofline{'.quick' if args.quick else ''}.json")
    if not torch.cuda.is_available():
        print(f"no CUDA device: nothing to calibrate; {TABLE} holds:")
        for name, entry in table["devices"].items():
            print(f"  {name}: {json.dumps(entry)}")
        write_bench_json(out, {"device": None, "measured": None, "stored": table}, __file__)
        return
    device = torch.cuda.get_device_name()
    name = next((key for key in table["devices"] if key in device), device)
    size, repeats = (2048, 5) if args.quick else (8192, 20)
    entry = dict(table["devices"].get(name, table["devices"][table["target"]]))
    entry["bf16_tflops"] = round(gemm_tflops(size, fp8=False, repeats=repeats), 1)
    entry["fp8_tflops"] = round(gemm_tflops(size, fp8=True, repeats=repeats), 1)
    entry["hbm_tb_s"] = round(hbm_tb_s(size * size * 8, repeats), 2)
    entry["cast_bytes_per_element"] = dict(entry["cast_bytes_per_element"])
    entry["overhead_us_per_linear"] = dict(entry["overhead_us_per_linear"])
    tokens = 4096 if args.quick else 16384
    entry["cast_bytes_per_element"]["torch"] = round(
        torch_cast_bytes(tokens, 4096, entry["hbm_tb_s"], repeats), 1
    )
    entry["overhead_us_per_linear"]["torch"] = round(torch_overhead_us(repeats), 1)
    try:
        _import_te()
        te_note = "Transformer Engine entries kept (not measured here)"
    except Exception:  # UserError: TE absent; the te entries stay at their spec values
        te_note = "Transformer Engine entries kept (it does not import here)"
    day = datetime.date.today().isoformat()
    entry["source"] = f"measured on {device} with torch {torch.__version__}, {day}; {te_note}"
    print(f"{name}: {json.dumps(entry, indent=2)}")
    print(f"stored: {json.dumps(table['devices'].get(name))}")
    write_bench_json(out, {"device": device, "measured": entry, "stored": table}, __file__)
    if args.write and not args.quick:
        table["devices"][name] = entry
        write_result_file(TABLE, json.dumps(table, indent=2) + "\n")
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    sys.exit(main_for_script(sys.modules[__name__]))
