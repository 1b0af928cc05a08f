"""The engine ds-sft builds updates exactly like DeepSpeed's own ZeRO-1/2 (same gradient norms, same
skipped updates, same weights), without scanning each gradient for inf/NaN (the gradient norm decides),
without norming each gradient on its own (one multi-tensor pass) and, at ZeRO 2, reducing the
gradients once per update instead of once per micro-batch: ds_sft/train/engine.py says why."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from deepspeed.runtime.zero import stage_1_and_2
from torch.utils._python_dispatch import TorchDispatchMode

from ds_sft.errors import UserError
from ds_sft.train import step as ds_sft_step
from ds_sft.train.engine import build_engine, reduces_gradients_once_per_update
from ds_sft.train.step import collate, model_inputs
from tests.train.helpers import TinyPacked, ds_config, settings, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.distributed deprecations

# (value written into one gradient element, whether DeepSpeed skips that update): a finite value
# whose square overflows fp32 makes the norm inf, which DeepSpeed's default treats as an overflow too
POISONS = [
    (None, False),
    (math.inf, True),
    (None, False),
    (-math.inf, True),
    (math.nan, True),
    (1e15, False),
    (1e30, True),
    (None, False),
]


def engine_for(stage: int, precision: str, deepspeeds_own: bool):
    """ds-sft's engine for the tiny model; ``deepspeeds_own``: with DeepSpeed's own per-gradient
    overflow scan and per-gradient norm put back (the reference)."""
    s = settings(zero_stage=stage, precision=precision, micro_batch_size=2, grad_accum=1)
    engine, _ = build_engine(tiny_model(), ds_config(s), s.weight_decay)
    if deepspeeds_own:
        for method in ("check_overflow", "get_grad_norm_direct"):
            vars(engine.optimizer).pop(method)  # the class's method again
    return engine


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (on a GPU each non-view op is a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def poison_hook(param, slot: dict):
    """Write ``slot["value"]`` (when set) into element 0 of ``param``'s gradient as it is computed."""

    def hook(grad):
        if slot["value"] is None:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = slot["value"]
        return grad

    param.register_hook(hook)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [1, 2])
def test_the_update_skips_clips_and_steps_exactly_like_deepspeeds_own(
    stage, precision, dist_env, monkeypatch
):
    scans = {"n": 0}
    scan = stage_1_and_2.has_inf_or_nan

    def counted_scan(x):
        scans["n"] += 1
        return scan(x)

    monkeypatch.setattr(stage_1_and_2, "has_inf_or_nan", counted_scan)
    dataset = TinyPacked(2 * len(POISONS), seed=5)
    engines = {name: engine_for(stage, precision, name == "deepspeed") for name in ("ds-sft", "deepspeed")}
    n_tensors = len(list(engines["ds-sft"].module.parameters()))
    slot = {"value": None}
    for engine in engines.values():
        params = list(engine.module.parameters())
        poison_hook(params[0], slot)  # the embedding: first in the partition
        poison_hook(params[-2], slot)  # a late block's weight

    for step, (value, skipped) in enumerate(POISONS):
        rows = [dataset[2 * step + i] for i in range(2)]
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        slot["value"] = value
        outcome = {}
        for name, engine in engines.items():
            scans["n"] = 0
            loss = engine(**model_inputs(batch, "cpu"))
            engine.backward(loss / 100, scale_wrt_gas=False)
            with OpCounter() as ops:
                engine.step()
            norms = ops.counts["linalg_vector_norm"]
            outcome[name] = (engine.optimizer.overflow, engine.get_global_grad_norm(), scans["n"], norms)
        ours, theirs = outcome["ds-sft"], outcome["deepspeed"]
        assert ours[0] == theirs[0] == skipped, (step, value, outcome)
        assert ours[2] == 0  # never scanned
        # DeepSpeed scans in bf16 only (check_grad_overflow); in fp32 it already leaves it to the norm
        assert (theirs[2] > 0) == (precision == "bf16"), outcome
        if not skipped:
            assert ours[1] == theirs[1] and math.isfinite(ours[1])
            # one norm per gradient tensor in DeepSpeed's; in ours only the groups' norms are combined
            assert theirs[3] >= n_tensors and ours[3] <= 1, outcome

    theirs = engines["deepspeed"].module.state_dict()
    for name, mine in engines["ds-sft"].module.state_dict().items():
        assert torch.equal(mine, theirs[name]), name
    for engine in engines.values():
        engine.destroy()


def test_deepspeeds_own_norm_stays_where_a_pipeline_shares_parameters(dist_env):
    """A pipeline's tied copies (``ds_pipe_replicated``) are counted once by DeepSpeed's own norm,
    which ds-sft's multi-tensor pass does not know how to do: that engine keeps DeepSpeed's."""
    s = settings(zero_stage=2, precision="fp32", micro_batch_size=2, grad_accum=1)
    model = tiny_model()
    next(model.parameters()).ds_pipe_replicated = True
    engine, _ = build_engine(model, ds_config(s), s.weight_decay)
    try:
        assert "get_grad_norm_direct" not in vars(engine.optimizer)
        assert "check_overflow" in vars(engine.optimizer)  # the scan is left out all the same
    finally:
        engine.destroy()


def ds_sft_engine(stage: int, precision: str, grad_accum: int, overlap_comm: bool = False):
    s = settings(zero_stage=stage, precision=precision, micro_batch_size=2, grad_accum=grad_accum)
    zero = {"stage": stage, "overlap_comm": overlap_comm}
    engine, _ = build_engine(tiny_model(), ds_config(s, zero_optimization=zero), s.weight_decay)
    return engine


@pytest.mark.parametrize("overlap_comm", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_zero2_reduces_the_gradients_once_per_update_with_the_same_result(
    precision, overlap_comm, dist_env, monkeypatch
):
    """ds-sft's ZeRO-2 step against DeepSpeed's own per-micro-batch reduction (the same engine with
    coalescing turned off): the same losses, norms, skipped updates and weights bit for bit, the
    engine's step counters in step, and each gradient handed to the reducer once per update instead
    of once per micro-batch. One update's gradient is poisoned with inf: both skip it."""
    grad_accum, steps, poisoned_step = 3, 4, 2
    reductions = collections.Counter()
    reduce = stage_1_and_2.DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads

    def counted_reduce(self, param, i):
        reductions[id(self)] += 1
        return reduce(self, param, i)

    optimizer_class = stage_1_and_2.DeepSpeedZeroOptimizer
    monkeypatch.setattr(optimizer_class, "reduce_independent_p_g_buckets_and_remove_grads", counted_reduce)
    dataset = TinyPacked(2 * grad_accum * steps, seed=7)
    batches = [
        [collate([dataset[2 * (grad_accum * step + m)], dataset[2 * (grad_accum * step + m) + 1]])
         for m in range(grad_accum)]
        for step in range(steps)
    ]  # fmt: skip
    results, engines = {}, {}
    for name in ("ds-sft", "deepspeed"):
        if name == "deepspeed":
            monkeypatch.setattr(ds_sft_step, "reduces_gradients_once_per_update", lambda engine, count: False)
        engine = engines[name] = ds_sft_engine(2, precision, grad_accum, overlap_comm)
        slot = {"value": None}
        poison_hook(list(engine.module.parameters())[-2], slot)
        outcomes = []
        for step, step_batches in enumerate(batches):
            slot["value"] = math.inf if step == poisoned_step else None
            before = reductions[id(engine.optimizer)]
            result = ds_sft_step.train_step(engine, step_batches, world_size=1)
            calls = reductions[id(engine.optimizer)] - before
            outcomes.append((result["loss"], result["grad_norm"], result["skipped"], calls))
        results[name] = (outcomes, engine.global_steps, engine.micro_steps, engine.skipped_steps)

    n_params = len(list(engines["ds-sft"].module.parameters()))
    ours, theirs = results["ds-sft"], results["deepspeed"]
    assert [o[:3] for o in ours[0]] == [t[:3] for t in theirs[0]], (ours, theirs)
    assert [o[2] for o in ours[0]] == [step == poisoned_step for step in range(steps)]
    assert ours[1:] == theirs[1:] == (steps, steps * grad_accum, 1)
    assert [t[3] for t in theirs[0]] == [grad_accum * n_params] * steps  # DeepSpeed: every micro-batch
    assert [o[3] for o in ours[0]] == [n_params] * steps  # ds-sft: once per update
    theirs_weights = engines["deepspeed"].module.state_dict()
    for name, mine in engines["ds-sft"].module.state_dict().items():
        assert torch.equal(mine, theirs_weights[name]), name
    for engine in engines.values():
        engine.destroy()


@pytest.mark.parametrize("grad_accum", [1, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_only_zero2_with_several_micro_batches_coalesces(stage, grad_accum, dist_env):
    engine = ds_sft_engine(stage, "bf16", grad_accum)
    try:
        assert reduces_gradients_once_per_update(engine, grad_accum) == (stage == 2 and grad_accum > 1)
    finally:
        engine.destroy()


def test_cpu_offload_keeps_deepspeeds_reduction_per_micro_batch(dist_env):
    """With the optimizer on the host ZeRO-2 sums the micro-batches in fp32 there: left as it is."""
    engine = ds_sft_engine(2, "bf16", 3)
    try:
        engine.zero_cpu_offload = lambda: True  # building DeepSpeed's CPU Adam takes minutes
        assert not reduces_gradients_once_per_update(engine, 3)
    finally:
        engine.destroy()


# Combinations DeepSpeed checks only inside deepspeed.initialize, after the model is loaded (its
# config reader accepts each): they ended `ds-sft train` in an AssertionError, ValueError or TypeError.
REFUSED_AT_INITIALIZE = {
    "bf16 master weights without offload": (
        {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
        "Master weights",
    ),
    "no gradient norm while clipping": (
        {"zero_optimization": {"stage": 2, "compute_grad_norm": False}},
        "clipping",
    ),
    "ZenFlow without offload": (
        {"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}},
        "Zenflow",
    ),
    "an argument AdamW does not take": (
        {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "bias_correction": False}}},
        "bias_correction",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_AT_INITIALIZE))
def test_settings_deepspeed_refuses_while_initializing_are_one_line(case, dist_env):
    extra, reason = REFUSED_AT_INITIALIZE[case]
    s = settings(zero_stage=2, precision="bf16", micro_batch_size=2, grad_accum=1)
    with pytest.raises(UserError, match=f"DeepSpeed refused the configuration .*{reason}") as err:
        build_engine(tiny_model(), ds_config(s, **extra), s.weight_decay)
    assert "\n" not in str(err.value)
