"""The roofline that decides which projections run in fp8 (``"fp8": {"select": "auto"}``), its table,
and the choice applied to a model. Data-sheet rates (fixed here, so a calibration that rewrites the
JSON does not move these tests): H200, bf16 989 TFLOP/s, fp8 1979, HBM 4.8 TB/s."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ds_sft.model.fp8 import Float8Linear, Fp8Recipe, apply_fp8
from ds_sft.model.fp8_roofline import TABLE, Roofline, load_table, roofline_for

SPEC = Roofline(
    name="H200",
    source="spec",
    bf16_tflops=989.0,
    fp8_tflops=1979.0,
    hbm_tb_s=4.8,
    cast_bytes_per_element={"te": 4.0, "torch": 31.0},
    overhead_us_per_linear={"te": 30.0, "torch": 60.0},
)
MODES = ["te", "torch"]


def pays(m: int, k: int, n: int, mode: str) -> bool:
    return SPEC.speedup(m, k, n, mode) > 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", [512, 2048, 8192, 16384])
def test_hidden_1024_stays_bf16(mode, tokens):
    """TE issue 445's case: hidden 1024 GEMMs are slower in fp8 (the casts and launches dominate)."""
    assert not pays(tokens, 1024, 1024, mode)
    assert not pays(tokens, 768, 768, mode)  # the 112m preset's attention


@pytest.mark.parametrize("tokens", [8192, 16384, 65536])
@pytest.mark.parametrize("k,n", [(2048, 2048), (2048, 5632), (5632, 2048), (4096, 4096), (8192, 8192)])
def test_wide_gemms_with_many_tokens_go_fp8_with_fused_casts(tokens, k, n):
    assert pays(tokens, k, n, "te")


def test_eager_casts_need_bigger_gemms_to_pay():
    """The torch path casts in separate eager kernels (~31 bytes of traffic per element against TE's 4)."""
    assert not pays(16384, 2048, 2048, "torch")
    assert pays(16384, 8192, 8192, "torch")
    for shape in [(16384, 2048, 2048), (8192, 4096, 4096), (65536, 4096, 4096)]:
        assert SPEC.speedup(*shape, "torch") < SPEC.speedup(*shape, "te")


def test_fp8_never_beats_twice_bf16():
    """The ceiling is the ratio of the tensor-core rates: casts only take away."""
    for shape in [(1 << 20, 16384, 16384), (16384, 8192, 8192)]:
        assert 1.0 < SPEC.speedup(*shape, "te") < SPEC.fp8_tflops / SPEC.bf16_tflops


sizes = st.integers(1, 4096).map(lambda units: 16 * units)  # multiples of 16 up to 65,536


@given(mode=st.sampled_from(MODES), m=sizes, k=sizes, n=sizes, dm=sizes, dk=sizes, dn=sizes)
def test_the_choice_is_monotonic_in_every_dimension(mode, m, k, n, dm, dk, dn):
    """More tokens or wider projections never turn fp8 off again."""
    if pays(m, k, n, mode):
        assert pays(m + dm, k, n, mode) and pays(m, k + dk, n, mode) and pays(m, k, n + dn, mode)
        assert pays(m + dm, k + dk, n + dn, mode)


def test_the_stored_table_names_each_gpu_and_its_source():
    table = load_table()
    assert table["target"] in table["devices"]
    for name in ("H100", "H200"):
        roofline = roofline_for(f"NVIDIA {name} 80GB HBM3", table)
        assert roofline.name == name
        assert roofline.source  # "spec, not yet calibrated" until bench/fp8_roofline.py --write ran there
        assert set(roofline.cast_bytes_per_element) == set(roofline.overhead_us_per_linear) == set(MODES)
        assert roofline.fp8_tflops > roofline.bf16_tflops > 0 and roofline.hbm_tb_s > 0
    assert roofline_for(None, table).name == table["target"]  # a CPU decides for the target GPU
    assert roofline_for("NVIDIA A100-SXM4-80GB", table).name == table["target"]
    assert TABLE.name == "fp8_roofline.json" and TABLE.parent.name == "model"


def projections(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A module tree with the trainer's projection names, on the meta device (no memory)."""
    model = nn.Module()
    for index, layer_shapes in enumerate([shapes, shapes]):
        block = nn.Module()
        for name, (k, n) in layer_shapes.items():
            block.add_module(name, nn.Linear(k, n, bias=False, device="meta"))
        model.add_module(f"block{index}", block)
    return model


def test_select_auto_swaps_only_the_projections_that_pay(monkeypatch):
    monkeypatch.setattr("ds_sft.model.fp8.roofline_for", lambda device_name: SPEC)
    shapes = {"q_proj": (1024, 1024), "o_proj": (2048, 2048), "up_proj": (8192, 8192)}
    lines = []
    model = apply_fp8(projections(shapes), "torch", Fp8Recipe(select="auto"), tokens=16384, say=lines.append)
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {"block0.up_proj", "block1.up_proj"}
    assert lines[0].startswith("fp8 torch: 2 of 6 projections in fp8 (select auto; 16384 tokens")
    table = {line.split()[0]: line for line in lines[1:]}
    assert table.keys() == {"q_proj", "o_proj", "up_proj"}
    assert "fp8 in   0 of   2 layers" in table["q_proj"] and "fp8 in   2 of   2 layers" in table["up_proj"]
    assert f"estimated {SPEC.speedup(16384, 8192, 8192, 'torch'):.2g}x" in table["up_proj"]

    model = apply_fp8(projections(shapes), "torch", Fp8Recipe(select="all"), tokens=16384, say=lines.append)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 6
    with pytest.raises(ValueError, match="tokens per micro-batch"):
        apply_fp8(projections(shapes), "torch", Fp8Recipe(select="auto"))


def test_select_auto_keeps_the_tiny_model_in_bf16():
    from ds_sft.model.config import ModelConfig
    from ds_sft.model.llama import LlamaModel

    lines = []
    model = apply_fp8(
        LlamaModel(ModelConfig.preset("tiny")), "torch", Fp8Recipe(select="auto"), tokens=64, say=lines.append
    )
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert lines[0].startswith("fp8 torch: 0 of 14 projections in fp8")
    assert len(lines) == 1 + 7  # one line per projection kind (all layers share the shapes)


def test_select_is_validated():
    from ds_sft.errors import UserError

    assert Fp8Recipe.from_dict({"select": "auto"}).select == "auto"
    with pytest.raises(UserError, match="fp8.select = 'some'"):
        Fp8Recipe.from_dict({"select": "some"})
