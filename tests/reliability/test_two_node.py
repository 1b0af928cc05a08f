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
