"""A 2-node x 1-process job across two network namespaces equals the single-process run.

The namespaces, the veth link and the launcher path are described in :mod:`netns`. The tests skip,
saying why, only where namespaces cannot be created (not root, no iproute2, no CAP_SYS_ADMIN); on
the project's machines and in CI they run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT
from .netns import NamespacesUnavailable, run_two_nodes, two_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.multiproc]

TOY = REPO_ROOT / "tests" / "reliability" / "zero2_toy.py"


def _two_nodes_or_skip(script, **kwargs):
    try:
        return run_two_nodes(script, **kwargs)
    except NamespacesUnavailable as err:
        pytest.skip(f"cannot create network namespaces here: {err}")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_namespaces_are_removed_even_when_the_body_fails():
    try:
        with pytest.raises(RuntimeError, match="boom"), two_namespaces() as nodes:
            assert nodes[0].namespace in _namespaces()
            raise RuntimeError("boom")
    except NamespacesUnavailable as err:
        pytest.skip(f"cannot create network namespaces here: {err}")
    assert nodes[0].namespace not in _namespaces()
    assert nodes[1].namespace not in _namespaces()


def test_each_namespace_sees_only_loopback_and_its_veth_end():
    try:
        with two_namespaces() as nodes:
            for node in nodes:
                inside = ["ip", "netns", "exec", node.namespace, "ip", "-o"]
                links = subprocess.run([*inside, "link"], capture_output=True, text=True).stdout
                names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
                assert names == sorted(["lo", node.interface])
                # No default route: nothing outside the 10.77.0.0/24 link is reachable.
                routes = subprocess.run([*inside, "route"], capture_output=True, text=True).stdout
                assert "default" not in routes and "10.77.0.0/24" in routes
    except NamespacesUnavailable as err:
        pytest.skip(f"cannot create network namespaces here: {err}")


def test_zero2_toy_two_nodes_match_one_process(tmp_path, ds_env):
    one = tmp_path / "one.json"
    subprocess.run([sys.executable, str(TOY), "--out", str(one)], env=ds_env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    two = tmp_path / "two.json"
    env = {"TORCH_EXTENSIONS_DIR": ds_env["TORCH_EXTENSIONS_DIR"]}
    results = _two_nodes_or_skip([str(TOY), "--out", str(two)], timeout=300, env=env)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"node {rank} failed:\n{result.stderr[-3000:]}"

    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert (single["world_size"], double["world_size"]) == (1, 2)
    assert double["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=0)


def test_trainer_two_nodes_match_one_process(tmp_path, ds_env):
    """``-m ds_sft.train`` on 2 nodes x 1 process (micro-batch 1) equals 1 process (micro-batch 2).

    Same global batch, same global sample stream (the sampler splits positions, not rows), and the
    loss is normalized by the global trained-token count, so only fp32 reduction order differs.
    """
    import torch
    from safetensors.torch import load_file

    from .conftest import write_tiny_data_dir
    from .runs import trajectory

    data = write_tiny_data_dir(tmp_path / "data")
    flags = ["--model", "tiny", "--data_dir", str(data), "--max_iters", "10", "--save_interval", "100",
             "--eval_interval", "10", "--eval_iters", "1", "--grad_accum", "1", "--learning_rate", "1e-3",
             "--min_lr", "1e-4", "--warmup_iters", "2", "--wandb_mode", "disabled",
             "--precision", "fp32"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": ds_env["TORCH_EXTENSIONS_DIR"],
           "PYTHONPATH": ds_env["PYTHONPATH"]}  # fmt: skip
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "ds_sft.train", *flags, "--micro_batch_size", "2",
                             "--out_dir", str(one)], env={**ds_env, **env}, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    two = tmp_path / "two"
    script = ["--module", "ds_sft.train", *flags, "--micro_batch_size", "1", "--out_dir", str(two)]
    for rank, result in enumerate(_two_nodes_or_skip(script, timeout=600, env=env)):
        assert result.returncode == 0, f"node {rank} failed:\n{result.stderr[-3000:]}"
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in result.stdout + result.stderr

    assert json.loads((two / "effective_config.json").read_text())["train_batch_size"] == 2  # 1 x 1 x 2 ranks
    expected, actual = trajectory(one), trajectory(two)
    assert sorted(actual) == list(range(1, 11))
    assert [actual[s] for s in sorted(actual)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                abs=1e-5, rel=0)  # fmt: skip
    single_weights = load_file(str(one / "final" / "model.safetensors"))
    double_weights = load_file(str(two / "final" / "model.safetensors"))
    for name, tensor in single_weights.items():
        torch.testing.assert_close(double_weights[name], tensor, rtol=0, atol=1e-5, msg=name)
