"""The engine ds-sft builds updates exactly like DeepSpeed's own ZeRO-1/2 (same gradient norms, same
skipped updates, same weights), without scanning each gradient for inf/NaN (the gradient norm decides)
and without norming each gradient on its own (one multi-tensor pass): ds_sft/train/engine.py says why."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from deepspeed.runtime.zero import stage_1_and_2
from torch.utils._python_dispatch import TorchDispatchMode

from ds_sft.train.engine import build_engine
from ds_sft.train.loop import model_inputs
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
