"""The micro-batch memory check: its estimate is a true lower bound; above it, one line and no engine.

The estimate is checked two ways on CPU (the path this machine trains on), across generated configs:
against what autograd really saves (saved-tensor hooks, in process), and against the peak resident
memory of a real forward and backward (a subprocess per config, its high-water mark reset before the
step). A bound above either would refuse a run that fits; one far below lets a micro-batch that cannot
fit start and be OOM-killed (65,536 rows of 32 tokens passed a 13.4 GiB estimate of 19.8 GiB free).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.cli import main
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from ds_sft.train import memory
from tests.train.helpers import write_data_dir

REPO_ROOT = Path(__file__).resolve().parents[2]


def packed_batch(config, batch: int, seq_len: int, documents: int) -> dict:
    """Rows of ``documents`` equal documents each (as the trainer feeds them: document ids given)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    length = -(-seq_len // documents)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "document_ids": (torch.arange(seq_len) // length).expand(batch, seq_len).contiguous(),
        "position_ids": (torch.arange(seq_len) % length).expand(batch, seq_len).contiguous(),
    }


def measured_saved_bytes(model, inputs: dict) -> int:
    """What autograd really keeps for backward (unique storages), measured with saved-tensor hooks."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not activations
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def config_strategy():
    """Small LLaMA shapes: head widths apart from d_model, grouped query heads, any FFN width."""

    @st.composite
    def build(draw):
        kv = draw(st.sampled_from([1, 2, 4]))
        heads = kv * draw(st.sampled_from([1, 2, 4]))
        return ModelConfig.preset(
            "tiny",
            kernels="auto",
            d_model=draw(st.sampled_from([32, 64, 96])),
            n_layers=draw(st.integers(1, 3)),
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=draw(st.sampled_from([8, 16, 32])),
            ffn_hidden=draw(st.sampled_from([32, 96, 256])),
        )

    return build()


@settings(max_examples=25)
@given(
    config=config_strategy(),
    batch=st.integers(1, 6),
    seq_len=st.integers(8, 128),
    documents=st.integers(1, 4),
    bf16=st.booleans(),
)
def test_the_saved_bound_is_at_most_what_autograd_saves(config, batch, seq_len, documents, bf16):
    model = LlamaModel(config).train().to(torch.bfloat16 if bf16 else torch.float32)
    real = measured_saved_bytes(model, packed_batch(config, batch, seq_len, documents))
    bound = memory.saved_activation_bytes(config, seq_len, batch, bf16, checkpointing=False, cuda=False)
    assert 0 < bound <= real, (bound, real)
    assert bound > real / 4  # and not a vacuous one


PEAK_SCRIPT = r"""
import json, sys
import torch
from ds_sft.model.config import ModelConfig
from ds_sft.model.llama import LlamaModel
from tests.train.test_memory import packed_batch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

case = json.loads(sys.argv[1])
torch.set_num_threads(1)
config = ModelConfig.preset("tiny", kernels="auto", **case["config"])
config.activation_checkpointing = case["checkpointing"]
model = LlamaModel(config).train().to(torch.bfloat16 if case["bf16"] else torch.float32)
model(**packed_batch(config, 1, case["seq_len"], 2)).backward()  # every code path once, at one row
model.zero_grad(set_to_none=True)
inputs = packed_batch(config, case["batch"], case["seq_len"], 2)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
model(**inputs).backward()
print(status("VmHWM:") - before)
"""

# (config overrides, batch, seq_len, bf16, checkpointing): each step's peak is 40-300 MB
PEAK_CASES = [
    ({}, 256, 32, False, False),
    ({}, 1024, 32, False, False),
    ({}, 256, 64, True, False),
    ({}, 96, 128, False, False),
    ({}, 256, 64, False, True),
    ({}, 128, 100, True, True),
    ({"n_heads": 8, "n_kv_heads": 1, "head_dim": 32, "ffn_hidden": 96}, 128, 64, False, False),
    (
        {"d_model": 128, "n_heads": 2, "head_dim": 16, "ffn_hidden": 512, "vocab_size": 1024},
        128,
        64,
        False,
        False,
    ),
]


@pytest.mark.parametrize(("overrides", "batch", "seq_len", "bf16", "checkpointing"), PEAK_CASES)
def test_the_estimate_is_at_most_the_measured_peak_of_a_step(overrides, batch, seq_len, bf16, checkpointing):
    case = dict(config=overrides, batch=batch, seq_len=seq_len, bf16=bf16, checkpointing=checkpointing)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps(case)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": path},
    )
    peak = int(out.stdout.split()[-1])
    config = ModelConfig.preset("tiny", **overrides)
    estimate = memory.activation_bytes(config, seq_len, batch, bf16, checkpointing, cuda=False)
    assert estimate <= peak, (estimate, peak)
    assert estimate > peak / 5, (estimate, peak)


def _tiny_model():
    return LlamaModel(ModelConfig.preset("tiny", kernels="auto"))


def test_65536_rows_of_32_tokens_are_refused_with_19_8_gib_free(monkeypatch):
    """The red team's case: the old estimate (13.4 GiB) let it start, and the OOM killer ended it."""
    monkeypatch.setattr(memory, "available_bytes", lambda: (int(19.8 * 2**30), "available in this test"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        memory.UserError, match=r"a micro-batch of 65536 x 32 tokens needs at least \d+\.\d GiB"
    ):
        memory.check_fits(_tiny_model(), 32, 65536, bf16=False)
    memory.check_fits(_tiny_model(), 32, 1024, bf16=False)  # a micro-batch that fits passes


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_bound_grows_with_the_micro_batch_and_shrinks_with_checkpointing(cuda, checkpointing):
    config = ModelConfig.preset("tiny")
    sizes = [memory.activation_bytes(config, 64, b, False, checkpointing, cuda) for b in (1, 2, 4)]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[2] == 4 * sizes[0]
    full = memory.activation_bytes(config, 64, 8, False, False, cuda)
    assert memory.activation_bytes(config, 64, 8, False, True, cuda) < full
    assert memory.activation_bytes(config, 64, 8, False, False, cuda, fp8=True) < full


def test_a_micro_batch_that_cannot_fit_is_one_line_before_the_engine(tmp_path, capsys, monkeypatch, dist_env):
    import ds_sft.train.loop

    data = write_data_dir(tmp_path / "data", train_rows=8)
    monkeypatch.setattr(memory, "available_bytes", lambda: (2**16, "available in this test"))
    monkeypatch.setattr(ds_sft.train.loop, "train", lambda *a, **k: pytest.fail("the engine was built"))
    argv = ["train", "--data_dir", str(data), "--model", "tiny", "--out_dir", str(tmp_path / "run"),
            "--fp8", "off", "--micro_batch_size", "2", "--grad_accum", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro_batch_size" in err[0] and "--seq_len" in err[0], err
    assert "GiB is available in this test" in err[0]


@pytest.mark.parametrize(("local_rank", "visible", "current"), [(0, 1, 0), (1, 1, 0), (3, 4, 3), (5, 4, 1)])
def test_free_memory_is_read_on_the_rank_s_own_gpu(local_rank, visible, current, monkeypatch):
    """The GPU ``init_distributed`` made current (``LOCAL_RANK`` modulo the visible GPUs), not
    ``LOCAL_RANK`` itself: with one GPU per rank (Slurm's --gpus-per-task) rank 1 sees only device 0,
    and ``mem_get_info(1)`` is an invalid device ordinal. No GPU here: the CUDA calls are stand-ins."""
    asked = []

    def mem_get_info(device):
        assert 0 <= device < visible, f"invalid device ordinal {device}"
        asked.append(device)
        return 7 * 2**30, 80 * 2**30

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: local_rank % visible)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert memory.available_bytes() == (7 * 2**30, f"free on cuda:{current}")
    assert asked == [current]
