"""Imports point one way (docs/ARCHITECTURE.md): the commands at the front use everything; ``train``
uses ``data``, ``model`` and ``kernels``; ``eval`` uses ``data`` and ``model``; ``model`` uses
``kernels``; ``kernels`` use nothing of ours; ``data`` and ``model`` never import each other (what both
need lives in the shared modules: ``labels``, ``vocab``, ``errors``, ``safe_write``...). DeepSpeed is
imported only under ``ds_sft/train/``. Every import is read, including those inside functions.

Each package's docstring is its map: one indented ``name.py`` line for every module in it."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "ds_sft"
SHARED = {
    "errors",
    "labels",
    "vocab",
    "positions",
    "locations",
    "model_source",
    "safe_read",
    "safe_write",
    "gguf_file",
    "json_input",
    "written_files",
    "run_layout",
    "options",
    "machine",
    "command",
    "__version__",
}
LAYERS = {  # a layer -> the layers it may use, besides itself and the shared modules
    "kernels": set(),
    "model": {"kernels"},
    "data": set(),
    "train": {"data", "model", "kernels"},
    "eval": {"data", "model"},
}
# the commands and what only they use (a bench's result file; the launchers' torchrun): anything
FRONT = {"cli", "demo", "export", "bench", "bench_result", "torchrun", "__init__", "__main__"}


def unit(module: str) -> str:
    """``ds_sft.train.loop`` -> ``train``; ``ds_sft.safe_write`` -> ``safe_write``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(source: str) -> list[str]:
    """Every module ``source`` imports, at any depth (``from ds_sft import x`` counts as ``ds_sft.x``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
            if node.module == "ds_sft":
                found += [f"ds_sft.{alias.name}" for alias in node.names]
    return found


def allowed(owner: str) -> set[str]:
    """What module ``owner`` (``train``, ``safe_write``...) may import of ours."""
    if owner == "kernels":
        return {"kernels"}
    if owner in SHARED:
        return SHARED
    return {owner} | SHARED | LAYERS[owner]


def violations(owner: str, source: str) -> list[str]:
    """The imports of module ``owner`` that point the wrong way."""
    wrong = []
    for name in imports(source):
        if name.split(".")[0] == "deepspeed" and owner != "train":
            wrong.append(f"{owner} imports {name}: DeepSpeed belongs to train")
        elif name.startswith("ds_sft.") and owner not in FRONT and unit(name) not in allowed(owner):
            wrong.append(f"{owner} imports {name}")
    return wrong


def test_imports_point_one_way():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).with_suffix("")
        owner = relative.parts[1] if len(relative.parts) > 2 else relative.parts[-1]
        assert owner in LAYERS or owner in SHARED or owner in FRONT, f"{path}: a module of no known layer"
        found += [f"{relative}: {line}" for line in violations(owner, path.read_text())]
    assert found == []


def test_the_check_sees_a_wrong_import_wherever_it_is():
    inside_a_function = "def f():\n    from ds_sft.model.llama import LlamaModel\n"
    assert violations("data", inside_a_function) == ["data imports ds_sft.model.llama"]
    assert violations("model", "from ds_sft import data") == ["model imports ds_sft.data"]
    assert violations("kernels", "import ds_sft.errors") == ["kernels imports ds_sft.errors"]
    assert violations("safe_write", "from ds_sft.train import loop") == ["safe_write imports ds_sft.train"]
    assert violations("eval", "import deepspeed") == ["eval imports deepspeed: DeepSpeed belongs to train"]
    assert violations("train", "import deepspeed\nfrom ds_sft.data import sources") == []


MAP_LINE = re.compile(r"^\s+(\w+)\.py\b", re.MULTILINE)  # "    loop.py   the training step"


@pytest.mark.parametrize(
    "package", sorted(path.parent for path in PACKAGE.rglob("__init__.py")), ids=lambda path: path.name
)
def test_each_package_s_docstring_maps_every_module_in_it(package):
    """A module added without a line in its package's map, or a line left for a module that is gone,
    makes the map a newcomer reads wrong. ``__init__`` and ``__main__`` need no line."""
    listed = set(MAP_LINE.findall(ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""))
    modules = {path.stem for path in package.glob("*.py")}
    assert sorted(modules - {"__init__", "__main__"} - listed) == []  # modules the map leaves out
    assert sorted(listed - modules) == []  # lines for modules that are not there
