"""MFU's arithmetic (FLOPs per token, peak FLOP/s) and the sink of the run's records (metrics.jsonl, wandb).

MFU (model FLOPs utilization) = achieved model FLOP/s / peak FLOP/s. Training a decoder costs
``6 N`` FLOPs per token for the weight matmuls (2 forward + 4 backward per parameter) plus
``12 L d T`` for attention scores and values (PaLM, appendix B), with N the weights a token is
multiplied by (``ModelConfig.matmul_parameters``: no input-embedding lookup, no norms), L layers,
attention width d (n_heads x head_dim: d_model in LLaMA, twice it in Qwen3-0.6B) and sequence
length T. N includes the LM head at every position, as PaLM counts it (comparable with other
trainers), though ds-sft's fused loss runs the head on trained tokens only: MFU reads above the FLOPs
the step ran (``bench/train_throughput.py``'s ``useful_flops`` counts those). Tokens per second count
positions, padding included. Peak: the datasheet dense number for known GPUs; on a CPU, what a
large matmul in the run's dtype actually reaches here (measured once at start), so CPU MFU reads
as "fraction of this machine's GEMM rate".

Only rank 0 writes; other ranks get a sink that does nothing. The console's lines (steps, evals,
alarms) and each step's record are :mod:`ds_sft.train.run_log`'s.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from pathlib import Path

from ds_sft.errors import UserError, first_line
from ds_sft.options import OutOfDomain, Text
from ds_sft.run_layout import METRICS_FILE
from ds_sft.safe_write import unshare

# Dense peak FLOP/s of one GPU (no sparsity) from NVIDIA's datasheets, (bf16, fp32), by a
# fragment of torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM card, the others say
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200". The longest fragment in the name wins, so
# "H100 PCIe" is read before "H100" and "L40S" before "L4" (:func:`datasheet_entry`).
GPU_PEAK_FLOPS = {
    "H200 NVL": (835e12, 60e12),
    "H200": (989e12, 67e12),
    "GH200": (989e12, 67e12),
    "H100 NVL": (835e12, 60e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "H800 PCIe": (756e12, 51e12),
    "H800": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L40": (181e12, 90.5e12),
    "A10G": (70e12, 31.2e12),
    "L4": (121e12, 30.3e12),
    "V100": (125e12, 15.7e12),
}
UNKNOWN_GPU = "A100"  # what the trainer assumes a GPU not in the table is
# Peak memory bandwidth in bytes/s from the same datasheets, by the same kind of fragment: the
# fraction of it a memory-bound kernel reaches (bench/kernel_speed.py). A100s differ by memory
# ("NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" against the 40 GB cards' "A100-SXM4-40GB",
# "A100-PCIE-40GB"); GH200 by the 96 GB HBM3 part.
GPU_PEAK_BANDWIDTH = {
    "H200 NVL": 4.8e12,
    "H200": 4.8e12,
    "GH200": 4.0e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "H800 PCIe": 2.0e12,
    "H800": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 864e9,
    "L40": 864e9,
    "A10G": 600e9,
    "L4": 300e9,
    "V100": 900e9,
}


def datasheet_entry(table: dict, device_name: str):
    """The value of ``table`` whose fragment names the GPU ``torch.cuda.get_device_name()`` calls
    ``device_name``, None for a GPU not in it. A fragment counts as whole words of the name, case
    aside ("A100-PCIE-40GB" and "H100 PCIe" both say PCIe): "H200" is not read in "GH200", nor "A100"
    in "RTX A1000". Of those found the longest wins: "H100 PCIe" over "H100", whatever the order."""
    found = [
        fragment
        for fragment in table
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", device_name, flags=re.IGNORECASE)
    ]
    return table[max(found, key=len)] if found else None


def datasheet_peak(device_name: str, bf16: bool = True) -> float | None:
    """The datasheet peak FLOP/s of the GPU named ``device_name`` (bf16, else fp32 without tensor
    cores: ds-sft leaves TF32 off, torch's default); None for a GPU not in :data:`GPU_PEAK_FLOPS`."""
    peaks = datasheet_entry(GPU_PEAK_FLOPS, device_name)
    if peaks is None:
        return None
    peak_bf16, peak_fp32 = peaks
    return peak_bf16 if bf16 else peak_fp32


def datasheet_bandwidth(device_name: str) -> float | None:
    """The datasheet peak memory bandwidth (bytes/s) of the GPU named ``device_name``; None for a GPU
    not in :data:`GPU_PEAK_BANDWIDTH`."""
    return datasheet_entry(GPU_PEAK_BANDWIDTH, device_name)


def flops_per_token(n_params: int, n_layers: int, attention_width: int, seq_len: int) -> float:
    return 6 * n_params + 12 * n_layers * attention_width * seq_len


def measure_matmul_flops(dtype, size: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of a ``size``-cube matmul on ``device``, best of ``repeats``: the ceiling the trainer's
    MFU divides by on a CPU, and ``bench/gpu_check.py gemm``'s. Each repeat is timed alone (CUDA
    events on a GPU, the wall clock on a CPU), so one slowed by a neighbour does not count."""
    import torch

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up: first call pays for allocation, thread start and (CUDA) picking the kernel
    if torch.device(device).type == "cuda":
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(repeats)]
        for start, end in events:
            start.record()
            a @ b
            end.record()
        torch.cuda.synchronize()
        best = min(start.elapsed_time(end) for start, end in events) / 1e3  # elapsed_time is in ms
    else:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@functools.cache
def peak_flops(bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from); measured once per process."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = datasheet_peak(name, bf16)
        if peak is None:
            assumed = f"{UNKNOWN_GPU} {'bf16' if bf16 else 'fp32'} peak"
            return datasheet_peak(UNKNOWN_GPU, bf16), f"{name} unknown: assumed {assumed}"
        return peak, f"{name} datasheet"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measure_matmul_flops(dtype), f"CPU {dtype} 1024^3 matmul measured"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


WANDB_MODES = ("offline", "online", "disabled")


def resolve_wandb_mode(flag: str | None, environ=os.environ) -> str:
    """The wandb mode of a run: --wandb_mode, else $WANDB_MODE, else online when WANDB_API_KEY is set
    (a user with a key wants their runs on the server), else offline."""
    if flag is not None:
        return flag
    mode = environ.get("WANDB_MODE")
    if mode is None:
        return "online" if environ.get("WANDB_API_KEY") else "offline"
    if mode not in WANDB_MODES:
        raise UserError(
            f"WANDB_MODE={mode!r} is not a wandb mode ds-sft runs with: set it to one of "
            f"{', '.join(WANDB_MODES)}, unset it, or pass --wandb_mode"
        )
    return mode


# wandb's rule for a project name, which it checks only when the run starts, after the model has loaded.
WANDB_PROJECT_NAME = Text(forbidden="/\\#?%:", max_length=128)


def resolve_wandb_project(flag: str | None, environ=os.environ) -> str:
    """The wandb project of a run: --wandb_project (checked by its parser), else $WANDB_PROJECT, else
    ds-sft's own. The variable is checked by the flag's rule before any work: a name wandb refuses
    stopped the run once the model had loaded, blaming the key or the network."""
    if flag is not None:
        return flag
    project = environ.get("WANDB_PROJECT", "")
    if not project.strip():
        return "ds-sft"
    try:
        return WANDB_PROJECT_NAME.check(project)
    except OutOfDomain as err:
        raise UserError(
            f"WANDB_PROJECT {err}: set it to a name wandb takes, unset it, or pass --wandb_project"
        ) from None


def start_wandb(wandb, project: str | None, mode: str, run_dir: Path, config: dict):
    """wandb's run for this training run, or one line saying why wandb refused to start one (a key
    it rejects, no server within its timeout, a name it does not take)."""
    # --wandb_project, else the user's $WANDB_PROJECT, else ds-sft's own; $WANDB_NAME likewise
    project = resolve_wandb_project(project)
    name = os.environ.get("WANDB_NAME") or run_dir.name
    try:
        return wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, name=name)
    except wandb.errors.Error as err:
        raise UserError(
            f"wandb could not start the run in {mode} mode ({first_line(err)}): fix WANDB_API_KEY or the "
            "network, or pass --wandb_mode offline (sync later with `wandb sync`) or --wandb_mode disabled"
        ) from None
    except ValueError as err:  # wandb's settings refuse a value: one of the WANDB_* variables
        variables = ", ".join(sorted(key for key in os.environ if key.startswith("WANDB_"))) or "none"
        raise UserError(
            f"wandb refused its settings ({first_line(err)}): check the WANDB_* variables set here "
            f"({variables}), or pass --wandb_mode disabled"
        ) from None


def cut_partial_last_line(path: Path) -> None:
    """Drop what follows the last newline of ``path``: a record a killed run was writing. Appended to,
    the next record was glued onto it and lost with it. The cut part cannot be read as a
    record, so nothing readable goes (called after :func:`~ds_sft.safe_write.unshare`, so a ``cp -al``
    copy keeps its bytes)."""
    try:
        with open(path, "rb+") as file:
            data = file.read()
            if data and not data.endswith(b"\n"):
                file.truncate(data.rfind(b"\n") + 1)  # rfind is -1 with no newline at all: truncated to 0
    except FileNotFoundError:
        return


class MetricsSink:
    """Rank 0's ``metrics.jsonl`` and (optional) wandb run. Other ranks: no-ops."""

    def __init__(
        self, run_dir: Path, enabled: bool, wandb_project: str | None, wandb_mode: str | None, config: dict
    ):
        self.enabled = enabled
        self.records: list[dict] = []
        self.wandb = None
        if not enabled:
            return
        path = run_dir / METRICS_FILE
        unshare(path)  # appended to: a cp -al copy's records stay the original's alone
        cut_partial_last_line(path)
        self.file = open(path, "a")  # noqa: SIM115 - lives as long as the run
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only")
            else:
                self.wandb = start_wandb(wandb, wandb_project, mode, run_dir, config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None and record["type"] != "start":  # a segment's start holds no metric
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for source, values in record.get("per_source", {}).items():
                flat.update({f"{source}/{k}": v for k, v in values.items()})
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
