"""When does an fp8 projection pay? A roofline over its GEMM shape, for ``"fp8": {"select": "auto"}``.

A projection ``y = x @ w.T`` with ``x [M, K]`` (M tokens per micro-batch) and ``w [N, K]`` runs
three GEMMs per training step (forward, input gradient, weight gradient), each ``2 M K N`` FLOPs.
fp8 doubles the tensor-core rate but must first quantize ``x``, ``w`` and the output gradient
``[M, N]``: casts and amax reductions that move ``cast_bytes_per_element`` bytes per element of
those three tensors through HBM, plus a fixed cost per layer (kernel launches, scale updates).
A GEMM takes ``max(FLOPs / rate, bytes / bandwidth)``; so per layer and step

    bf16 = 3 * max(2MKN / bf16_rate, 2 (MK + KN + MN) / hbm)
    fp8  = 3 * max(2MKN / fp8_rate,  (MK + KN + 2 MN) / hbm) + cast_bytes (MK + KN + MN) / hbm + overhead

and the layer runs in fp8 when ``fp8 < bf16``. Small GEMMs lose (Transformer Engine issue 445:
hidden 1024 took 2.57 ms in fp8 against 0.28 ms in bf16); wide ones with many tokens win. The cast
cost depends on the fp8 path: TE fuses cast, amax and transpose into one pass; the ``torch`` path
compiles each training cast into a few fused kernels on fp8 tensor cores (before, eager, its casts
measured 83 bytes per element and 1.7 ms per layer on an H200: no projection paid).

The rates live in ``fp8_roofline.json`` beside this file: data-sheet values until
``bench/fp8_roofline.py --write`` measures the GPU it runs on. The rule is about the target GPU's
arithmetic, so on a CPU (or a GPU without an entry) it decides for the table's ``target``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("fp8_roofline.json")


@dataclass(frozen=True)
class Roofline:
    """One GPU's rates; ``cast_bytes_per_element`` and ``overhead_us_per_linear`` per fp8 path."""

    name: str
    source: str  # "spec, not yet calibrated" or how and when it was measured
    bf16_tflops: float
    fp8_tflops: float
    hbm_tb_s: float
    cast_bytes_per_element: dict[str, float]
    overhead_us_per_linear: dict[str, float]

    def step_seconds(self, m: int, k: int, n: int, mode: str) -> tuple[float, float]:
        """(bf16, fp8) seconds that one projection's three GEMMs take per micro-batch."""
        flops, hbm = 2.0 * m * k * n, self.hbm_tb_s * 1e12
        operands, output = m * k + k * n, m * n
        bf16 = 3 * max(flops / (self.bf16_tflops * 1e12), 2 * (operands + output) / hbm)
        gemm = 3 * max(flops / (self.fp8_tflops * 1e12), (operands + 2 * output) / hbm)
        casts = self.cast_bytes_per_element[mode] * (operands + output) / hbm
        return bf16, gemm + casts + self.overhead_us_per_linear[mode] * 1e-6

    def speedup(self, m: int, k: int, n: int, mode: str) -> float:
        """Estimated bf16 time / fp8 time of a projection: above 1 fp8 pays."""
        bf16, fp8 = self.step_seconds(m, k, n, mode)
        return bf16 / fp8


def load_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text())


def roofline_for(device_name: str | None, table: dict | None = None) -> Roofline:
    """The entry whose key appears in ``device_name`` (e.g. "NVIDIA H200"), else the table's target."""
    table = table or load_table()
    devices = table["devices"]
    name = next((key for key in devices if device_name and key in device_name), table["target"])
    return Roofline(name=name, **devices[name])
