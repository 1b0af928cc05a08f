"""The trainer's evals: val loss at step 0 (before any update) and at every eval step, on the fixed
stratified val sample, equal to a token-by-token reference over the model's full logits."""

from __future__ import annotations

import pytest
import torch

from ds_sft.data.sampler import ResumableSampler
from ds_sft.data.val_sample import stratified_rows, trained_tokens_by_source
from ds_sft.train.final import consolidated_state_dict
from ds_sft.train.loop import train
from tests.model.test_scoring import reference
from tests.train.helpers import TinyPacked, ds_config, settings, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _reference_eval(model, dataset, rows):
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([dataset[i][k] for i in rows]) for k in dataset[0]}
        logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    return reference(logits, batch["labels"], batch["source_ids"], dataset.sources)


@pytest.mark.parametrize("stage", [0, 3])
def test_evals_from_step_zero_match_the_reference(stage, dist_env, tmp_path):
    s = settings(zero_stage=stage, max_iters=2, eval_interval=1, eval_iters=3, micro_batch_size=2)
    train_set, val_set = TinyPacked(24, seed=3), TinyPacked(13, seed=99)
    rows = stratified_rows(trained_tokens_by_source(val_set), 6)
    assert rows != list(range(6))  # not the first rows

    summary = train(
        s, ds_config(s), tiny_model(), train_set, val_set, tmp_path, ResumableSampler(24, seed=0), None
    )
    final = tiny_model()
    final.load_state_dict(consolidated_state_dict(summary["engine"]))
    summary["engine"].destroy()
    evals = [r for r in summary["records"] if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert evals[0]["train_loss"] is None

    for record, model in ((evals[0], tiny_model()), (evals[-1], final)):
        overall, by_source = _reference_eval(model, val_set, rows)
        assert record["val_tokens"] == overall["tokens"]
        assert record["val_loss"] == pytest.approx(overall["loss"], rel=1e-5)
        assert record["val_acc"] == pytest.approx(overall["token_accuracy"])
        assert record["per_source"].keys() == by_source.keys()
        for name, metrics in by_source.items():
            assert record["per_source"][name]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
            assert record["per_source"][name]["tokens"] == metrics["tokens"]
    assert evals[-1]["val_loss"] != evals[0]["val_loss"]  # the step-0 eval saw the weights before the update


def test_ds_sft_eval_refuses_a_val_split_without_trained_tokens_in_one_line(tmp_path):
    """``ds-sft eval``'s val pass on rows that are all prompt: summarize's ValueError was a traceback."""
    from ds_sft.data.shards import PackedDataset
    from ds_sft.errors import UserError
    from ds_sft.eval.evaluate import validation_metrics
    from tests.train.helpers import write_data_dir

    data = write_data_dir(tmp_path / "data", train_rows=2, val_trained_rows=())
    with pytest.raises(
        UserError, match="no val row has a trained token .*: prepare the data again, or pass --no_val"
    ):
        validation_metrics(tiny_model(), PackedDataset(data, "val"), batch_size=2)
