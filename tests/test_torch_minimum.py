"""pyproject's ``torch>=`` minimum covers every torch API ds-sft calls that a newer release brought.

Each row names a call by its shape in the syntax tree of ``ds_sft/`` and the first torch release that
accepts it (read off the releases' own sources). A minimum below a call's release is an install that
pip allows and that fails at import or mid-run: ``@torch.compiler.disable(reason=...)`` decorates a
function of ``ds_sft/model/scoring.py`` at import, and torch 2.7's ``disable`` takes no ``reason``, while
pyproject said ``torch>=2.5``. A row whose call the code no longer makes is dropped, not kept stale.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO_ROOT


def dotted(node: ast.expr) -> str:
    """``torch.compiler.disable`` for the attribute chain of a call's function ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords if k.arg}


# (the call, the first torch release that accepts it, how its ast.Call looks)
FIRST_RELEASES = [
    (
        "torch.compiler.disable(reason=...)",  # 2.7.1's torch/compiler/__init__.py: disable(fn, recursive)
        (2, 8),
        lambda call: dotted(call.func).endswith("compiler.disable") and "reason" in keywords(call),
    ),
    (
        "torch.mm(..., out_dtype=...)",  # aten::mm.dtype; 2.7.1's mm takes only out=
        (2, 8),
        lambda call: dotted(call.func) == "torch.mm" and "out_dtype" in keywords(call),
    ),
    (
        "scaled_dot_product_attention / flex_attention(enable_gqa=...)",
        (2, 5),
        lambda call: "enable_gqa" in keywords(call),
    ),
]


def torch_minimum() -> tuple[int, ...]:
    import tomllib  # Python 3.11+: a local import, as tests/test_wheel_install.py does

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if re.match(r"torch\b", d)]
    found = re.fullmatch(r"torch\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?", pin)
    assert found, f"pyproject's torch requirement {pin!r} is not a plain torch>=X.Y"
    return tuple(map(int, found.groups()))


def calls_in_package() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted((REPO_ROOT / "ds_sft").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(REPO_ROOT)
        calls += [(f"{where}:{node.lineno}", node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return calls


@pytest.mark.parametrize("what,release,matches", FIRST_RELEASES, ids=[row[0] for row in FIRST_RELEASES])
def test_the_torch_minimum_has_each_api_the_package_calls(what, release, matches):
    uses = [where for where, call in calls_in_package() if matches(call)]
    assert uses, f"ds_sft/ no longer calls {what}: drop its row from FIRST_RELEASES"
    minimum = torch_minimum()
    assert minimum >= release, (
        f"pyproject says torch>={'.'.join(map(str, minimum))}, but {what} needs torch "
        f">={'.'.join(map(str, release))} ({', '.join(uses)}): raise the minimum or avoid the call"
    )
