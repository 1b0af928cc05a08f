"""Every tensor the trainer hands to torch.distributed lives on the engine's device.

NCCL serves CUDA tensors only, so a collective tensor built on the host crashes the first GPU step;
gloo on CPU would never show it. These tests run the trainer's collectives under
:class:`tests.train.fake_accelerator.FakeAccelerator`: the engine's device is a second device and
the process group serves that device alone, as NCCL does on a GPU.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_sft.labels import IGNORE_INDEX
from ds_sft.model.scoring import MODEL_INPUTS
from ds_sft.train import checkpointing
from ds_sft.train.distributed import StopSignal, all_reduce_sum
from ds_sft.train.step import model_inputs, train_step
from tests.train.fake_accelerator import DEVICE, FakeAccelerator

pytestmark = pytest.mark.usefixtures("dist_env")


class FakeEngine:
    """The surface of a DeepSpeed engine that ``train_step`` uses, on ``DEVICE``. Its loss sum is a
    fixed function of the tokens (0.001 x the sum of the trained tokens' ids), computed where the
    inputs are, so the test knows the right answer."""

    device = DEVICE

    def __init__(self):
        self.optimizer = SimpleNamespace(overflow=False, param_groups=[])  # a ZeRO optimizer
        self.backward_losses, self.steps = [], 0

    def __call__(self, input_ids, labels, **inputs):
        for tensor in (input_ids, labels, *inputs.values()):
            assert tensor.device == self.device, "train_step must move every input to the engine's device"
        return ((labels != IGNORE_INDEX) * input_ids).sum().float() * 1e-3

    def backward(self, loss, scale_wrt_gas):
        assert not scale_wrt_gas
        self.backward_losses.append(loss)

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return 1.0

    def zero_optimization_stage(self):
        return 1  # steps between micro-batches (ZeRO 2 would coalesce them: tests/train/test_engine.py)

    def zero_cpu_offload(self):
        return False


def make_batches(shapes: list[tuple[int, int]], ignore_every: int) -> list[dict]:
    batches, offset = [], 0
    for rows, length in shapes:
        ids = torch.arange(offset, offset + rows * length).view(rows, length) % 97 + 1
        labels = ids.clone()
        labels.view(-1)[::ignore_every] = IGNORE_INDEX
        offset += rows * length
        batches.append(
            {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).expand(rows, length)}
        )
    return batches


@settings(max_examples=25)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9)), min_size=1, max_size=4),
    ignore_every=st.integers(1, 5),
)
def test_train_step_collectives_run_on_the_engine_device(shapes, ignore_every):
    batches = make_batches(shapes, ignore_every)
    trained = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    loss_sum = sum(float(((b["labels"] != IGNORE_INDEX) * b["input_ids"]).sum()) * 1e-3 for b in batches)
    engine = FakeEngine()
    with FakeAccelerator():
        result = train_step(engine, batches, world_size=1)
    assert result["trained_tokens"] == trained
    if trained:
        assert result["loss"] == pytest.approx(loss_sum / trained, rel=1e-6)
        assert engine.steps == len(batches)
    else:  # nothing trained: no loss to report, not a loss of 0, and nothing run or updated
        assert result["loss"] is None and engine.steps == 0 and not engine.backward_losses
    assert result["finite"]
    assert all(loss.device == DEVICE for loss in engine.backward_losses)


def test_stop_signal_agreement_runs_on_the_engine_device_in_one_tensor_made_once(monkeypatch):
    """Each step's vote answers the signal caught (0: none), whatever came before, on the engine's
    device, in the tensor made when the loop began: no host list or new tensor per step."""
    with FakeAccelerator():
        stop = StopSignal(DEVICE)
        vote = stop.vote
        for name in ("tensor", "as_tensor", "zeros", "full", "empty"):  # what would build a new one
            monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("a tensor built per step"))
        for signum in (0, 15, 0, 2, 1, 0, 15):
            assert stop.agreed(signum) == signum
            assert stop.vote is vote and vote.device == DEVICE and vote.dtype == torch.float64


VALUES = [[0.0], [1.5, -2.0, 3.25], torch.arange(6, dtype=torch.float64).view(2, 3)]


@pytest.mark.parametrize("values", VALUES)
def test_all_reduce_sum_returns_a_new_tensor_on_the_device(values):
    with FakeAccelerator():
        source = values.to(DEVICE) if isinstance(values, torch.Tensor) else values
        total = all_reduce_sum(source, DEVICE)
        assert total.device == DEVICE and total is not source
        assert total.cpu().tolist() == torch.as_tensor(values, dtype=torch.float64).tolist()  # one rank


def test_rng_states_gather_through_the_device_backend():
    expected = checkpointing.rng_state()
    with FakeAccelerator():
        (gathered,) = checkpointing.gather_rng_states()
    assert torch.equal(gathered["torch"], expected["torch"])
    assert gathered["python"] == expected["python"]


def test_the_fake_backend_refuses_host_tensors():
    """The harness itself: a CPU tensor in a collective raises, as under NCCL (else the tests above
    would pass on code that builds its collective tensors on the host)."""
    with FakeAccelerator(), pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("target", ["cuda", "cpu", DEVICE.type])
@pytest.mark.parametrize("on_host", list(itertools.product([True, False], repeat=len(MODEL_INPUTS))))
def test_model_inputs_pin_only_host_tensors(on_host, target, monkeypatch):
    """Bound for CUDA, a host tensor goes through pinned memory (non_blocking), a tensor already on a
    device by a plain ``.to``: pinning it raises "only dense CPU tensors can be pinned", which is what
    ``bench/train_throughput.py`` (whose batches are on the GPU before ``train_step``) met. No CUDA
    here: pinning a host tensor and every copy are stand-ins that record what was asked; pinning a
    device (meta) tensor is torch's own."""
    real_pin, pinned, moved = torch.Tensor.pin_memory, [], []

    def pin(self):
        if self.device.type != "cpu":
            return real_pin(self)  # raises, as for a CUDA tensor
        pinned.append(self)
        return self

    def to(self, device, non_blocking=False):
        moved.append((self.device.type, torch.device(device).type, non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = {
        key: torch.zeros(2, 3, dtype=torch.long, device="cpu" if host else DEVICE)
        for key, host in zip(MODEL_INPUTS, on_host, strict=True)
    }
    batch["source_ids"] = torch.zeros(2, 3, dtype=torch.long)  # not a model input: left behind
    inputs = model_inputs(batch, torch.device(target))
    assert list(inputs) == list(MODEL_INPUTS)
    to_pin = [target == "cuda" and host for host in on_host]
    assert [any(t is batch[key] for t in pinned) for key in MODEL_INPUTS] == to_pin
    assert moved == [
        ("cpu" if host else DEVICE.type, target, pin) for host, pin in zip(on_host, to_pin, strict=True)
    ]
