"""bench/kernel_speed.py's GPU timing, whose order is the part that runs without a GPU: every case is
timed once per round, in turn, after an untimed round, and reported as its median."""

from __future__ import annotations

import importlib.util
import statistics

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("kernel_speed", REPO_ROOT / "bench" / "kernel_speed.py")
kernel_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_speed)


def test_cases_take_turns_and_the_first_round_is_not_counted():
    """A device whose clocks ramp up (each call faster than the last) slows whichever case runs first;
    in turns over rounds, after an untimed one, every case sees the same ramp, a few calls apart."""
    calls: list[str] = []
    clock = iter(range(100, 0, -1))  # each call 1 ms faster than the one before

    def bench(fn, grad_to_none=None):
        calls.append(fn())
        return float(next(clock))

    cases = [(f"op {name}", name, lambda name=name: name, 1, None) for name in ("a", "b", "c")]
    timings = kernel_speed.time_in_rounds(cases, bench, rounds=3)
    assert calls == ["a", "b", "c"] * 4
    # a's timed calls were the 4th, 7th and 10th: 97, 94, 91 ms (the untimed first round: 100)
    assert timings == {
        (f"op {n}", n): statistics.median([97 - i, 94 - i, 91 - i]) for i, n in enumerate("abc")
    }


def test_a_case_that_fails_is_reported_and_the_others_still_run():
    def bench(fn, grad_to_none=None):
        return fn()

    def broken():
        raise TypeError("another signature")

    cases = [("op", "liger", broken, 1, None), ("op", "triton", lambda: 2.0, 1, None)]
    timings = kernel_speed.time_in_rounds(cases, bench, rounds=2)
    assert isinstance(timings[("op", "liger")], TypeError) and timings[("op", "triton")] == 2.0


def test_liger_rms_norm_writing_over_its_dy_leaves_the_others_dy_alone():
    """Liger's RMSNorm backward writes dx into the dy it is given (``in_place=True``, its default):
    sharing one dy, every provider timed after Liger's first round ran its backward on Liger's dx."""
    import torch

    from ds_sft.kernels.reference import rms_norm_reference

    class OverwritesDy(torch.autograd.Function):  # Liger's in-place backward, on CPU
        @staticmethod
        def forward(ctx, x, w, eps):
            ctx.save_for_backward(x, w)
            return rms_norm_reference(x, w, eps)

        @staticmethod
        def backward(ctx, dy):
            dy.mul_(-3.0)  # dx written where dy was
            return dy, None, None

    seen = []
    liger = {"rms_norm": lambda x, w, eps: OverwritesDy.apply(x, w, eps)}
    cases = kernel_speed._rms_norm_cases(4, 8, "cpu", torch.float32, rms_norm_reference, liger)
    backward = {provider: fn for op, provider, fn, *_ in cases if "bwd" in op}
    backward["liger"]()  # Liger's first round
    hooked = torch.Tensor.backward

    def spy(tensor, gradient=None, *args, **kwargs):
        seen.append(gradient.clone())
        return hooked(tensor, gradient, *args, **kwargs)

    torch.Tensor.backward = spy
    try:
        backward["eager"]()
        backward["liger"]()
        backward["eager"]()
    finally:
        torch.Tensor.backward = hooked
    assert torch.equal(seen[0], seen[2])


def test_a_case_that_ends_in_its_own_one_line_error_is_that_line(monkeypatch):
    """A size too large for memory: the case's process said so in one line (exit 2), and the parent
    wrapped its whole stderr in a RuntimeError, a traceback."""
    import subprocess

    import pytest

    from ds_sft.errors import UserError

    said = "bench/kernel_speed.py: error: out of memory (8.0 GiB asked): pass a smaller --tokens (see --help)"
    for code, stderr, expected in [
        (2, f"warning: x\n{said}\n", UserError),
        (1, "Traceback ...\n", RuntimeError),
    ]:
        done = subprocess.CompletedProcess([], code, stdout="", stderr=stderr)
        monkeypatch.setattr(kernel_speed.subprocess, "run", lambda *a, done=done, **k: done)
        with pytest.raises(expected) as raised:
            kernel_speed._in_fresh_process("run_timing_case", "float32", 1, 1, 1, 1, 1)
        if expected is UserError:
            assert str(raised.value) == said.partition(": error: ")[2]


# torch.cuda.get_device_name() of each card -> its datasheet memory bandwidth, GB/s (None: not known)
DEVICE_BANDWIDTHS = {
    "NVIDIA H100 80GB HBM3": 3350,  # the SXM card
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA H100 NVL": 3900,
    "NVIDIA H200": 4800,
    "NVIDIA H200 NVL": 4800,
    "NVIDIA GH200 480GB": 4000,  # holds "H200", but is not an H200
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100-PCIE-40GB": 1555,
    "NVIDIA L40S": 864,
    "NVIDIA L4": 300,
    "NVIDIA RTX A1000": None,  # holds "A100"
    "NVIDIA Hypothetical X9": None,
}


@pytest.mark.parametrize(("name", "gbs"), DEVICE_BANDWIDTHS.items())
def test_the_gpu_benchmark_reads_each_card_s_own_bandwidth(monkeypatch, name, gbs):
    """The bench matched its own table's fragments in the order written, first hit wins: an H100 NVL
    (3.9 TB/s) was read as an H100 SXM (3.35) and a GH200 as an H200; now it reads the trainer's
    datasheet lookup, the longest fragment standing as whole words in the name."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert kernel_speed.gpu_bandwidth(torch.device("cuda")) == (name, gbs and gbs * 1e9)


@pytest.mark.parametrize("order", [1, -1], ids=["as written", "reversed"])
def test_each_bandwidth_entry_is_read_for_its_name_whatever_the_table_s_order(monkeypatch, order):
    """A card named by an entry gets that entry's bandwidth though a shorter entry is in its name too
    ("H100" in "H100 NVL", "A100" in "A100-SXM4-80GB", "L4" in "L40S")."""
    from ds_sft.train import metrics

    table = dict(list(metrics.GPU_PEAK_BANDWIDTH.items())[::order])
    monkeypatch.setattr(metrics, "GPU_PEAK_BANDWIDTH", table)
    for fragment, bandwidth in table.items():
        assert metrics.datasheet_bandwidth(f"NVIDIA {fragment}") == bandwidth, fragment
